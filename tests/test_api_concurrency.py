"""Many clients at once against a real ``pied serve``: 200 concurrent streams each get the text they
get alone, and a client that disconnects (streaming or not) frees its KV blocks."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest
from server import EventStream, ServerProcess, choice_text, read_stream, running_server

MODEL = "tiny-llama"
NUM_STREAMS = 200
MAX_TOKENS = 6
WORDS = ["class", "def", "return", "import", "while", "lambda", "yield", "with", "try", "raise"]
COMPLETION_PROMPTS = [f"The {word} statement" for word in WORDS]
CHAT_MESSAGES = [[{"role": "user", "content": f"Explain {word} briefly."}] for word in WORDS]
DEVICE_USAGE = "pied:kv_cache_usage_perc"
ABORTED = 'pied:request_success_total{finished_reason="abort"}'


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> ServerProcess:
    with running_server(tiny_model_dir("llama"), "--served-model-name", MODEL) as process:
        yield process


def request_body(index: int, stream: bool) -> tuple[str, dict]:
    """Request ``index``: even ones are text completions, odd ones chat, over 10 prompts each."""
    common = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": stream}
    if index % 2 == 0:
        return "/v1/completions", {**common, "prompt": COMPLETION_PROMPTS[index // 2 % len(WORDS)]}
    return "/v1/chat/completions", {**common, "messages": CHAT_MESSAGES[index // 2 % len(WORDS)]}


async def test_200_concurrent_streams_match_sequential_results(server: ServerProcess) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=150)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Each distinct request alone first (greedy, so the answer is deterministic).
        reference: dict[tuple[str, str], tuple[str, str]] = {}
        for index in range(2 * len(WORDS)):
            path, body = request_body(index, stream=False)
            async with session.post(server.base_url + path, json=body) as response:
                assert response.status == 200, await response.text()
                choice = (await response.json())["choices"][0]
            reference[path, json.dumps(body.get("prompt") or body.get("messages"))] = (
                choice_text(path, choice, streamed=False),
                choice["finish_reason"],
            )

        requests = [request_body(index, stream=True) for index in range(NUM_STREAMS)]
        started = time.monotonic()
        results = await asyncio.gather(*(read_stream(session, server.base_url, p, b) for p, b in requests))
        elapsed = time.monotonic() - started

    mismatches = []
    for (path, body), result in zip(requests, results):
        expected = reference[path, json.dumps(body.get("prompt") or body.get("messages"))]
        if result != expected:
            mismatches.append((path, body.get("prompt") or body.get("messages"), result, expected))
    assert not mismatches, f"{len(mismatches)} of {NUM_STREAMS} differ, e.g. {mismatches[:3]}"
    print(f"{NUM_STREAMS} concurrent streams in {elapsed:.2f} s")
    assert server.request("GET", "/health").status == 200


def wait_for(server: ServerProcess, condition, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = server.metrics()
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {samples}")
        time.sleep(0.02)


def idle_and_empty(samples: dict[str, float]) -> bool:
    return samples[DEVICE_USAGE] == 0 and samples["pied:num_requests_running"] == 0


@pytest.mark.parametrize("n", [1, 3])
def test_disconnect_mid_stream_frees_blocks(server: ServerProcess, n: int) -> None:
    wait_for(server, idle_and_empty)
    aborted_before = server.metrics()[ABORTED]
    body = {"model": MODEL, "prompt": COMPLETION_PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True,
            "n": n}  # fmt: skip
    stream = EventStream(server, "/v1/completions", body)
    assert stream.status == 200
    for _ in range(3):
        assert stream.next_event()["choices"] is not None
    wait_for(server, lambda s: s[DEVICE_USAGE] > 0 and s["pied:num_requests_running"] == n)
    stream.close()
    wait_for(server, idle_and_empty, timeout=5)
    # Aborted, not finished on its own (400 tokens would also end, a little later).
    assert server.metrics()[ABORTED] - aborted_before == n


def test_disconnect_while_waiting_for_a_full_response(server: ServerProcess) -> None:
    wait_for(server, idle_and_empty)
    aborted_before = server.metrics()[ABORTED]
    body = json.dumps(
        {"model": MODEL, "prompt": COMPLETION_PROMPTS[1], "max_tokens": 400, "ignore_eos": True}
    )
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        wait_for(server, lambda s: s[DEVICE_USAGE] > 0 and s["pied:num_requests_running"] == 1)
    wait_for(server, idle_and_empty, timeout=5)
    assert server.metrics()[ABORTED] - aborted_before == 1


def test_inproc_engine_and_chat_template_override(tiny_model_dir, tmp_path) -> None:
    """``--inproc`` (the engine's actors as threads of the server) serves the same API: streamed
    text equals full text, and a disconnect frees the blocks. ``--chat-template`` replaces the
    model's template."""
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    with running_server(tiny_model_dir("llama"), "--inproc", "--chat-template", str(template)) as inproc:
        tokens = inproc.request("POST", "/tokenize", {"messages": CHAT_MESSAGES[0]}).json()["tokens"]
        rendered = inproc.request("POST", "/detokenize", {"tokens": tokens}).json()["prompt"]
        assert rendered == f"[user] {CHAT_MESSAGES[0][0]['content']}\n[assistant] "

        body = {"messages": CHAT_MESSAGES[1], "temperature": 0, "max_tokens": 12}
        full = inproc.request("POST", "/v1/chat/completions", body).json()["choices"][0]
        stream = EventStream(inproc, "/v1/chat/completions", {**body, "stream": True})
        events = stream.rest()
        assert events[-1] == "[DONE]"
        streamed = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in e["choices"])
        assert streamed == full["message"]["content"]

        wait_for(inproc, idle_and_empty)
        long_body = {"prompt": COMPLETION_PROMPTS[2], "max_tokens": 400, "ignore_eos": True, "stream": True}
        stream = EventStream(inproc, "/v1/completions", long_body)
        stream.next_event()
        wait_for(inproc, lambda s: s[DEVICE_USAGE] > 0)
        stream.close()
        wait_for(inproc, idle_and_empty, timeout=5)
        assert inproc.metrics()[ABORTED] == 1
