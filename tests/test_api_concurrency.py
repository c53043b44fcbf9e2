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
FINISHED = 'pied:request_success_total{finished_reason="length"}'
RUNNING = "pied:num_requests_running"


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
    return samples[DEVICE_USAGE] == 0 and samples[RUNNING] == 0


def disconnect_while_running(server: ServerProcess, start, n: int = 1, attempts: int = 3) -> int:
    """Start a long request (``start()`` returns its connection), close the connection once
    ``/metrics`` shows it running (``n`` sequences, device blocks in use), wait until the server is
    idle, and return how many requests it counted aborted. A request that finishes before a poll
    sees it running (a loaded machine can deschedule this process for the whole generation) is
    started again: closing it then would test nothing."""
    for _ in range(attempts):
        wait_for(server, idle_and_empty)
        before = server.metrics()
        finished = before.get(FINISHED, 0)
        connection = start()
        try:
            samples = wait_for(
                server,
                lambda s, finished=finished: (s[DEVICE_USAGE] > 0 and s[RUNNING] == n) or s.get(FINISHED, 0) > finished,
                timeout=30,
            )
        finally:
            connection.close()
        if samples.get(FINISHED, 0) == finished:
            wait_for(server, idle_and_empty, timeout=10)
            return server.metrics()[ABORTED] - before[ABORTED]
    raise AssertionError(f"each of {attempts} requests finished before /metrics showed it running")


@pytest.mark.parametrize("n", [1, 3])
def test_disconnect_mid_stream_frees_blocks(server: ServerProcess, n: int) -> None:
    body = {"model": MODEL, "prompt": COMPLETION_PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True,
            "n": n}  # fmt: skip

    def start() -> EventStream:
        stream = EventStream(server, "/v1/completions", body)
        assert stream.status == 200
        for _ in range(3):
            assert stream.next_event()["choices"] is not None
        return stream

    # Aborted, not finished on its own (400 tokens would also end, a little later).
    assert disconnect_while_running(server, start, n) == n


def test_disconnect_while_waiting_for_a_full_response(server: ServerProcess) -> None:
    body = json.dumps(
        {"model": MODEL, "prompt": COMPLETION_PROMPTS[1], "max_tokens": 400, "ignore_eos": True}
    )

    def start() -> socket.socket:
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        return sock

    assert disconnect_while_running(server, start) == 1


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

        long_body = {"prompt": COMPLETION_PROMPTS[2], "max_tokens": 400, "ignore_eos": True, "stream": True}

        def start() -> EventStream:
            stream = EventStream(inproc, "/v1/completions", long_body)
            stream.next_event()
            return stream

        assert disconnect_while_running(inproc, start) == 1
