"""Every error the API answers, in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
with the right status, and the server keeps serving afterwards. Also: draining on SIGTERM, and an
engine that dies mid-stream (an SSE error event, then exit non-zero)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import openai
import pytest
from server import EventStream, Response, ServerProcess, running_server, start_server

MODEL = "tiny"
API_KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_LIMIT = 8192
MESSAGES = [{"role": "user", "content": "Hello there"}]
PROMPT = "The class statement defines"


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> ServerProcess:
    flags = [
        "--served-model-name", MODEL, "--api-key", API_KEY, "--max-request-body-bytes", str(BODY_LIMIT),
        "--max-queued-requests", "1", "--max-num-seqs", "1",
    ]  # fmt: skip
    with running_server(tiny_model_dir("llama"), *flags) as process:
        yield process


def post(server: ServerProcess, path: str, body, headers: dict[str, str] | None = None) -> Response:
    return server.request("POST", path, body, headers={**AUTH, **(headers or {})})


def assert_error(response: Response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert response.status == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"].endswith("Error")
    assert error["code"] == status
    assert error["param"] == param, error
    assert contains in error["message"], error["message"]
    return error


def assert_still_serving(server: ServerProcess) -> None:
    response = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert response.status == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------- 400


def test_invalid_json(server: ServerProcess) -> None:
    for body in (b'{"model": ', b"not json", b"\xff\xfe"):
        error = assert_error(post(server, "/v1/chat/completions", body), 400)
        assert error["type"] == "BadRequestError"
    assert_error(post(server, "/v1/completions", b""), 400)
    assert_still_serving(server)


WRONG_TYPES = [
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [1]}, "stop[0]"),
    ("/v1/completions", {"prompt": 7}, "prompt"),
    ("/v1/completions", [PROMPT], None),
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, "tokens[0]"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), WRONG_TYPES)
def test_wrong_types(server: ServerProcess, path: str, body, param: str | None) -> None:
    assert_error(post(server, path, body), 400, param)


OUT_OF_RANGE = [
    ("/v1/chat/completions", {"temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"top_k": -2}, "top_k"),
    ("/v1/chat/completions", {"min_p": 2}, "min_p"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"n": 1000}, "n"),
    ("/v1/chat/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"stop": [""]}, "stop"),
    ("/v1/chat/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"logit_bias": {"five": 1.0}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"999999": 1.0}}, "logit_bias"),
    ("/v1/completions", {"logprobs": 50}, "logprobs"),
    ("/v1/completions", {"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ("/v1/completions", {"prompt": [999999]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3, -4]]}, "prompt[1]"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"echo": True, "logprobs": 1, "stream": True}, "echo"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "fields", "param"), OUT_OF_RANGE)
def test_out_of_range_values(server: ServerProcess, path: str, fields: dict, param: str) -> None:
    base = {"model": MODEL, "messages": MESSAGES} if "chat" in path else {"model": MODEL, "prompt": PROMPT}
    if path == "/detokenize":
        base = {}
    assert_error(post(server, path, {**base, **fields}), 400, param)


def test_prompt_that_does_not_fit(server: ServerProcess) -> None:
    max_model_len = server.request("GET", "/v1/models", headers=AUTH).json()["data"][0]["max_model_len"]
    too_long = [5] * (max_model_len + 1)
    assert_error(
        post(server, "/v1/completions", {"prompt": too_long, "max_tokens": 1}),
        400,
        "prompt",
        "maximum context length",
    )
    # Exactly the context, no max_tokens (all that is left): no room, and the message says so.
    assert_error(
        post(server, "/v1/completions", {"prompt": [5] * max_model_len, "max_tokens": None}),
        400,
        "prompt",
        f"has {max_model_len} input tokens, which leaves no room for output",
    )
    # The prompt fits, the prompt plus max_tokens does not.
    assert_error(
        post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": max_model_len}),
        400,
        "max_tokens",
        "maximum context length",
    )
    long_message = [{"role": "user", "content": "word " * (max_model_len * 2)}]
    assert_error(
        post(server, "/v1/chat/completions", {"messages": long_message, "max_tokens": 1}),
        400,
        "messages",
        "maximum context length",
    )
    assert_still_serving(server)


# ---------------------------------------------------------------- 401, 404, 405, 413


def test_unknown_model(server: ServerProcess) -> None:
    error = assert_error(
        post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": MESSAGES}), 404, "model"
    )
    assert error["type"] == "NotFoundError"
    assert_error(server.request("GET", "/v1/models/gpt-9", headers=AUTH), 404, "model")
    assert_still_serving(server)


def test_api_key(server: ServerProcess) -> None:
    body = {"prompt": PROMPT, "max_tokens": 1}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": "Basic x"},
    ):
        response = server.request("POST", "/v1/completions", body, headers=headers)
        error = assert_error(response, 401)
        assert error["type"] == "AuthenticationError"
        assert response.headers["www-authenticate"] == "Bearer"
    assert_error(server.request("GET", "/v1/models"), 401)
    # Probes, scrapers and version checks need no key (vLLM guards only /v1).
    assert server.request("GET", "/health").status == 200
    assert server.request("GET", "/metrics").status == 200
    assert server.request("GET", "/version").status == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=server.url("/v1"), api_key=API_KEY, max_retries=0).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert_still_serving(server)


def test_wrong_method_or_path(server: ServerProcess) -> None:
    response = server.request("GET", "/v1/chat/completions", headers=AUTH)
    assert_error(response, 405)
    assert "POST" in response.headers["allow"]
    assert_error(server.request("DELETE", "/v1/models", headers=AUTH), 405)
    assert_error(post(server, "/v1/nothing/here", {}), 404)
    # HEAD on a GET route is its GET without the body (load balancers probe with it).
    for path, headers in (("/health", {}), ("/v1/models", AUTH)):
        head = server.request("HEAD", path, headers=headers)
        assert head.status == 200 and head.body == b"", (path, head.status)
    assert server.request("HEAD", "/v1/models").status == 401  # the key still guards it
    assert "HEAD" not in response.headers["allow"]  # and POST routes take no HEAD
    assert_still_serving(server)


def test_body_too_large(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "x" * (2 * BODY_LIMIT)}
    error = assert_error(post(server, "/v1/completions", body), 413)
    assert error["type"] == "RequestEntityTooLargeError"
    assert_still_serving(server)


# ---------------------------------------------------------------- 503


def wait_idle(server: ServerProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = server.metrics()
        if samples["pied:num_requests_running"] == 0 and samples["pied:num_requests_waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle: {samples}")


def test_queue_full(server: ServerProcess) -> None:
    # --max-num-seqs 1: one request runs, the next waits; --max-queued-requests 1: a third is refused.
    long_request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    running = EventStream(server, "/v1/completions", long_request, AUTH)
    waiting = None
    try:
        assert running.status == 200
        assert running.next_event()["choices"] is not None  # generating
        waiting = EventStream(server, "/v1/completions", long_request, AUTH)
        assert waiting.status == 200  # headers sent: it is in the queue
        refused = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 1})
        error = assert_error(refused, 503)
        assert error["type"] == "ServiceUnavailableError"
        assert "queue" in error["message"]
    finally:
        running.close()
        if waiting is not None:
            waiting.close()
    wait_idle(server)
    assert_still_serving(server)


def test_sigterm_drains(tiny_model_dir) -> None:
    """SIGTERM: /health and new requests answer 503, the request in flight finishes, exit 0."""
    server = start_server(tiny_model_dir("llama"))
    try:
        stream = EventStream(
            server,
            "/v1/completions",
            {"prompt": PROMPT, "max_tokens": 120, "ignore_eos": True, "stream": True},
        )
        assert stream.next_event()["choices"]
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while server.request("GET", "/health").status == 200:
            assert time.monotonic() < deadline, "/health never reported draining"
            time.sleep(0.02)
        assert_error(server.request("GET", "/health"), 503)
        assert_error(server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}), 503)
        events = stream.rest()
        assert events[-1] == "[DONE]"
        finish = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert finish == ["length"]
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def worker_pids(parent: int) -> dict[str, int]:
    """The server's worker processes by name (``workers.executor`` -> "executor")."""
    workers = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) != parent:
            continue
        for i, arg in enumerate(command[:-1]):
            if arg == b"-m" and command[i + 1].startswith(b"workers."):
                workers[command[i + 1].decode().split(".", 1)[1]] = int(entry)
    return workers


def test_engine_death_mid_stream(tiny_model_dir) -> None:
    """A worker dies: the stream in flight gets an error event then [DONE], new requests get 503
    (or find the port closed), and the daemon exits non-zero."""
    server = start_server(tiny_model_dir("llama"))
    try:
        workers = worker_pids(server.process.pid)
        if "executor" not in workers:
            pytest.skip(f"the server runs no worker processes: {workers}")
        stream = EventStream(
            server,
            "/v1/chat/completions",
            {"messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "stream": True},
        )
        assert stream.next_event()["choices"]
        os.kill(workers["executor"], signal.SIGKILL)
        events = stream.rest()
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"
        try:
            after = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}, timeout=5)
        except OSError:
            pass  # already gone
        else:
            assert_error(after, 503)
        assert server.process.wait(30) != 0
        assert "the engine died" in server.log()
    finally:
        server.stop()


# ---------------------------------------------------------------- 500


async def test_500_body_carries_no_internals(caplog) -> None:
    """A bug in a handler is a 500 in the OpenAI shape; its text goes to the log, not the client."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from pied.api.app import error_middleware

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("secret-detail /srv/private/path")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/broken", broken)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/broken")
        body = await response.read()
    assert response.status == 500
    error = json.loads(body)["error"]
    assert error["code"] == 500 and error["type"] == "InternalServerError"
    assert b"secret" not in body and b"RuntimeError" not in body and b"/srv" not in body
    assert "secret-detail" in caplog.text  # logged instead
