"""No single client takes the daemon down: one test per attack against a real ``pied serve`` over
loopback HTTP. During each attack a bystander polls ``/health`` and runs greedy requests; after it,
the daemon still has its pid, every bystander request got exactly the text it gets alone, and the
KV cache is empty again. Loops are bounded in count and time; nothing asserts a tight wall-clock
limit (latencies are printed, not asserted).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server import Response, ServerProcess, running_server, start_server

from pied.tokenizer import Tokenizer

MODEL = "tiny"
API_KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DEADLINE = 3.0  # --keep-alive-timeout (headers), --body-timeout, --write-timeout
MAX_ADMITTED = 8
MAX_CONNECTIONS = 24
MAX_STOP_TOKEN_IDS = 64
VICTIM = {"model": MODEL, "prompt": "The class statement defines", "max_tokens": 16, "temperature": 0}
DEVICE_USAGE = "pied:kv_cache_usage_perc"
ABORTED = 'pied:request_success_total{finished_reason="abort"}'
HEALTH_TIMEOUT = 10.0  # per /health request: generous, these machines are loaded
WAIT = 60.0  # how long any poll below may take before the test fails


def serve_flags(*extra: str) -> list[str]:
    return [
        "--served-model-name", MODEL, "--api-key", API_KEY,
        "--max-admitted-requests", str(MAX_ADMITTED), "--max-connections", str(MAX_CONNECTIONS),
        "--keep-alive-timeout", str(DEADLINE), "--body-timeout", str(DEADLINE),
        "--write-timeout", str(DEADLINE), "--max-stop-token-ids", str(MAX_STOP_TOKEN_IDS), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    with running_server(model_dir, *serve_flags()) as process:
        yield process


@pytest.fixture(scope="module")
def reference(server: ServerProcess) -> str:
    """The victim's greedy text with the server to itself."""
    return victim_text(server)


def post(
    server: ServerProcess, path: str, body, headers: dict[str, str] | None = None, timeout: float = 60
) -> Response:
    return server.request("POST", path, body, headers={**AUTH, **(headers or {})}, timeout=timeout)


def victim_text(server: ServerProcess) -> str:
    response = post(server, "/v1/completions", VICTIM)
    assert response.status == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_error(response: Response, status: int, param: str | None = None) -> dict:
    assert response.status == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error
    assert error["param"] == param, error
    return error


# ---------------------------------------------------------------- the bystander


class Bystander:
    """While an attack runs: one thread polls /health, another sends the victim request again and
    again. ``check`` asserts every answer was right."""

    def __init__(self, server: ServerProcess, reference: str, victims: bool = True) -> None:
        self.server = server
        self.reference = reference
        self.stop = threading.Event()
        self.health: list[tuple[int, float]] = []  # (status, seconds)
        self.texts: list[str] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._poll_health, daemon=True)]
        if victims:
            self.threads.append(threading.Thread(target=self._run_victims, daemon=True))

    def _poll_health(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status = self.server.request("GET", "/health", timeout=HEALTH_TIMEOUT).status
            except OSError as error:
                self.failures.append(f"/health: {error!r}")
                status = 0
            self.health.append((status, time.monotonic() - started))
            self.stop.wait(0.05)

    def _run_victims(self) -> None:
        while not self.stop.is_set():
            try:
                self.texts.append(victim_text(self.server))
            except (OSError, AssertionError) as error:
                self.failures.append(f"victim: {error!r}")

    def __enter__(self) -> Bystander:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)

    def check(self) -> None:
        assert not self.failures, self.failures[:5]
        assert self.health and all(status == 200 for status, _ in self.health), self.health[:20]
        print(f"/health: {len(self.health)} answers, slowest {max(s for _, s in self.health):.3f} s")
        if len(self.threads) > 1:
            assert self.texts, "no victim request completed during the attack"
            assert all(text == self.reference for text in self.texts), self.texts


def assert_recovered(server: ServerProcess, pid: int, reference: str) -> None:
    """Same process, KV cache empty again, and the victim's text unchanged."""
    assert server.process.poll() is None and server.process.pid == pid, server.log()[-3000:]
    deadline = time.monotonic() + WAIT
    while True:
        samples = server.metrics()
        idle = samples["pied:num_requests_running"] == 0 and samples["pied:num_requests_waiting"] == 0
        if idle and samples[DEVICE_USAGE] == 0:
            break
        assert time.monotonic() < deadline, f"KV usage never returned to 0: {samples}"
        time.sleep(0.1)
    assert victim_text(server) == reference


def poll(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------- raw sockets


def raw_connect(server: ServerProcess, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # before connecting, so the window starts small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(HEALTH_TIMEOUT)
    sock.connect((server.host, server.port))
    return sock


def request_head(path: str, content_length: int, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n".encode()
        + extra
        + b"\r\n"
    )


RECEIVED: dict[int, bytes] = {}  # what each raw socket (by fileno) has received so far


def closed_by_server(sock: socket.socket) -> bytes | None:
    """Everything the server sent once it closed the connection; None while it is still open."""
    sock.settimeout(0.2)
    key = sock.fileno()
    try:
        while chunk := sock.recv(65536):
            RECEIVED[key] = RECEIVED.get(key, b"") + chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return RECEIVED.pop(key, b"")


def wait_closed(sock: socket.socket, what: str) -> bytes:
    result: list[bytes] = []

    def closed() -> bool:
        data = closed_by_server(sock)
        if data is not None:
            result.append(data)
        return data is not None

    poll(closed, what)
    return result[0]


# ---------------------------------------------------------------- limits


def test_stop_token_ids_flood_is_refused_before_it_is_decoded(server: ServerProcess, reference: str) -> None:
    pid = server.process.pid
    # 30 MiB of stop_token_ids (just under the 32 MiB body limit) with the largest n.
    ids = b",".join([b"1"] * (15 << 20))
    body = b'{"model": "tiny", "prompt": "Hi", "n": 128, "max_tokens": 4, "stop_token_ids": [' + ids + b"]}"
    with Bystander(server, reference) as bystander:
        for _ in range(3):
            assert_error(post(server, "/v1/completions", body), 400, "stop_token_ids")
    bystander.check()
    # Under the prescan's size, the decoded list is held to the same limit.
    too_many = {**VICTIM, "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}
    assert_error(post(server, "/v1/completions", too_many), 400, "stop_token_ids")
    assert_recovered(server, pid, reference)


def test_repeated_stop_token_ids_count_once(server: ServerProcess, reference: str) -> None:
    answer = post(server, "/v1/completions", {**VICTIM, "logprobs": 0}).json()["choices"][0]
    tokens = answer["logprobs"]["tokens"]
    tokenizer_ids = post(server, "/tokenize", {"prompt": tokens[2], "add_special_tokens": False}).json()[
        "tokens"
    ]
    stop_id = tokenizer_ids[0]
    # Ten times the limit in copies of one id: after duplicates are removed it is one stop id.
    body = {**VICTIM, "stop_token_ids": [stop_id] * (10 * MAX_STOP_TOKEN_IDS)}
    assert_error(post(server, "/v1/completions", body), 400, "stop_token_ids")  # the raw list is too long
    body["stop_token_ids"] = [stop_id] * MAX_STOP_TOKEN_IDS
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_id
    assert reference.startswith(choice["text"])


def test_list_limits(server: ServerProcess) -> None:
    assert_error(post(server, "/v1/completions", {**VICTIM, "prompt": ["a"] * 300}), 400, "prompt")
    stops = ["x" * 600, "y" * 600]  # each under, together over --max-stop-string-chars (1024)
    assert_error(post(server, "/v1/completions", {**VICTIM, "stop": stops}), 400, "stop")
    messages = [{"role": "user", "content": "hi"}] * 1025
    assert_error(
        post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages}), 400, "messages"
    )


def test_admission_bound_answers_429_with_retry_after_before_reading_the_body(
    server: ServerProcess, reference: str
) -> None:
    pid = server.process.pid
    holders = []
    try:
        with Bystander(server, reference, victims=False) as bystander:
            # Requests that send their headers and then nothing: each holds an admission place.
            for _ in range(MAX_ADMITTED):
                sock = raw_connect(server)
                sock.sendall(request_head("/v1/completions", 1000) + b"{")
                holders.append(sock)

            def refused() -> Response | None:
                # Headers only, announcing a body that is never sent: the 429 comes without it.
                sock = raw_connect(server)
                try:
                    sock.sendall(request_head("/v1/completions", 10 << 20))
                    sock.settimeout(HEALTH_TIMEOUT)
                    data = sock.recv(65536)
                finally:
                    sock.close()
                return parse_response(data) if data.startswith(b"HTTP/1.1 429") else None

            response = poll(refused, "a 429", timeout=DEADLINE * 0.8)
            error = assert_error(response, 429)
            assert error["type"] == "RateLimitError"
            assert int(response.headers["retry-after"]) >= 1
        bystander.check()
        # The holders are cut at the body deadline (408), which frees their places.
        for sock in holders:
            data = wait_closed(sock, "the body deadline")
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
            assert_error(parse_response(data), 408)
    finally:
        for sock in holders:
            sock.close()
    assert_recovered(server, pid, reference)


def parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return Response(int(lines[0].split()[1]), headers, body)


# ---------------------------------------------------------------- deadlines


def test_slow_headers_are_cut_at_the_deadline(server: ServerProcess, reference: str) -> None:
    pid = server.process.pid
    sock = raw_connect(server)
    try:
        with Bystander(server, reference) as bystander:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()

            def cut() -> bool:
                try:  # one more header byte at a time: trickling does not extend the deadline
                    sock.sendall(b"X")
                except OSError:
                    return True
                return closed_by_server(sock) is not None

            poll(cut, "the header deadline")
            print(f"slow headers cut after {time.monotonic() - started:.1f} s (deadline {DEADLINE} s)")
        bystander.check()
    finally:
        sock.close()
    assert_recovered(server, pid, reference)


def test_slow_body_is_cut_at_the_deadline(server: ServerProcess, reference: str) -> None:
    pid = server.process.pid
    sock = raw_connect(server)
    try:
        with Bystander(server, reference) as bystander:
            sock.sendall(request_head("/v1/completions", 1000) + b'{"prompt": ')

            def answered() -> bytes | None:
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")  # a byte now and then: still past the deadline in the end
                return closed_by_server(sock)

            data = poll(answered, "the body deadline")
        bystander.check()
        assert_error(parse_response(data), 408)
    finally:
        sock.close()
    assert_recovered(server, pid, reference)


def open_unread_stream(server: ServerProcess) -> socket.socket:
    """A streamed request with a large output whose client never reads (a small receive window)."""
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "Hi",
            "n": 16,
            "max_tokens": 400,
            "ignore_eos": True,
            "logprobs": 20,
            "stream": True,
        }
    ).encode()
    sock = raw_connect(server, receive_buffer=4096)
    sock.sendall(request_head("/v1/completions", len(body)) + body)
    return sock


def test_stream_that_is_never_read_is_cut_at_the_write_deadline(
    server: ServerProcess, reference: str
) -> None:
    pid = server.process.pid
    aborted_before = server.metrics().get(ABORTED, 0)
    sock = open_unread_stream(server)
    try:
        with Bystander(server, reference) as bystander:
            # Its 16 choices are aborted (the client went silent), long before 400 tokens each.
            poll(lambda: server.metrics().get(ABORTED, 0) >= aborted_before + 16, "the write deadline")
        bystander.check()
    finally:
        sock.close()
    assert_recovered(server, pid, reference)


def test_sigterm_drain_finishes_on_time_with_slow_clients_connected(model_dir: Path) -> None:
    shutdown_timeout = 120.0  # what an undefended drain would wait for
    server = start_server(model_dir, *serve_flags("--shutdown-timeout", str(shutdown_timeout)))
    socks = []
    try:
        slow_headers = raw_connect(server)
        slow_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow_body = raw_connect(server)
        slow_body.sendall(request_head("/v1/completions", 1000) + b"{")
        unread = open_unread_stream(server)
        socks = [slow_headers, slow_body, unread]
        poll(lambda: server.metrics()["pied:num_requests_running"] > 0, "the unread stream to run")
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status = poll(lambda: server.process.poll() is not None, "the drain", timeout=shutdown_timeout / 2)
        elapsed = time.monotonic() - started
        assert status is not None and server.process.returncode == 0, server.log()[-3000:]
        print(f"drained in {elapsed:.1f} s (deadlines {DEADLINE} s, shutdown timeout {shutdown_timeout:g} s)")
    finally:
        for sock in socks:
            sock.close()
        server.stop()


# ---------------------------------------------------------------- connections


def test_idle_connections_give_way_to_new_ones(server: ServerProcess, reference: str) -> None:
    pid = server.process.pid
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):  # every place taken by a connection that sends nothing
            idle.append(raw_connect(server))
        with Bystander(server, reference) as bystander:
            for _ in range(10):
                assert server.request("GET", "/health", timeout=HEALTH_TIMEOUT).status == 200
        bystander.check()
        # The oldest idle ones were closed to make room.
        assert closed_by_server(idle[0]) is not None
    finally:
        for sock in idle:
            sock.close()
    assert_recovered(server, pid, reference)


# ---------------------------------------------------------------- work sized for the event loop


def test_detokenize_of_millions_of_ids_does_not_freeze_health(
    server: ServerProcess, reference: str, model_dir: Path
) -> None:
    pid = server.process.pid
    ids = [(7 * i) % 500 + 5 for i in range(2_000_000)]
    with Bystander(server, reference) as bystander:
        response = post(server, "/detokenize", {"tokens": ids}, timeout=300)
    bystander.check()
    assert response.status == 200, response.text[:500]
    assert response.json()["prompt"] == Tokenizer(model_dir).decode(ids, skip_special_tokens=False)
    assert_recovered(server, pid, reference)


def test_many_long_prompts_are_tokenized_off_the_loop(server: ServerProcess, reference: str) -> None:
    pid = server.process.pid
    prompts = ["The class statement defines " * 2000 + str(i) for i in range(8)]  # far past the context
    with Bystander(server, reference) as bystander:
        for _ in range(2):
            response = post(server, "/v1/completions", {**VICTIM, "prompt": prompts})
            assert_error(response, 400, "prompt[0]")
    bystander.check()
    assert_recovered(server, pid, reference)


def test_worst_case_stop_strings_leave_the_text_exact(server: ServerProcess, reference: str) -> None:
    """The most and longest stop strings allowed, none of which occurs: every choice's text is the
    reference (the linear matching itself is counted in tests/test_stop_matcher.py)."""
    pid = server.process.pid
    stops = [reference[:1] * 31 + chr(0x4E00 + i) for i in range(32)]  # 1,024 characters in all
    with Bystander(server, reference) as bystander:
        answer = post(server, "/v1/completions", {**VICTIM, "n": 16, "stop": stops})
    bystander.check()
    assert answer.status == 200, answer.text
    assert [choice["text"] for choice in answer.json()["choices"]] == [reference] * 16
    assert_recovered(server, pid, reference)


# ---------------------------------------------------------------- bad input


def test_non_utf8_authorization_header_is_401(server: ServerProcess, reference: str) -> None:
    pid = server.process.pid
    for header in (b"Bearer \xff\xfe\xfd", b"\xc3\x28 key", b"Bearer " + API_KEY.encode() + b"\x80"):
        sock = raw_connect(server)
        try:
            sock.sendall(
                b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: "
                + header
                + b"\r\nX-Request-Id: \xff\xfe\r\n\r\n"
            )
            data = wait_closed(sock, "the answer")
        finally:
            sock.close()
        response = parse_response(data)
        assert_error(response, 401)
        assert response.headers["x-request-id"].isascii()  # a fresh id, not the bytes sent
    assert_recovered(server, pid, reference)


def test_out_of_vocabulary_ids_are_400(server: ServerProcess, reference: str) -> None:
    pid = server.process.pid
    vocab_size = 512
    for prompt, param in (
        ([1, 2, vocab_size], "prompt"),
        ([[5, 6], [7, -1]], "prompt[1]"),
        ([2**31 - 1], "prompt"),
    ):
        assert_error(post(server, "/v1/completions", {**VICTIM, "prompt": prompt}), 400, param)
    assert_error(post(server, "/detokenize", {"tokens": [5, vocab_size + 7]}), 400, "tokens")
    # Past the context: refused on its length before its ids are read.
    assert_error(post(server, "/v1/completions", {**VICTIM, "prompt": [5] * 100_000}), 400, "prompt")
    assert_recovered(server, pid, reference)
