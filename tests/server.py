"""Start a real ``pied serve`` in a subprocess on a free 127.0.0.1 port, and talk to it over HTTP.

``running_server(model_dir, *flags)`` is a context manager (use it from a fixture): it starts
``python -m pied serve --port 0`` (the server picks a free port and prints it), waits for
``/health``, yields a :class:`ServerProcess`, and always stops the server and its worker processes
(SIGTERM, then SIGKILL of the whole process group), so no test leaves an orphan behind.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"pied: listening on http://(?P<host>[^:]+):(?P<port>\d+)")


class ServerProcess:
    def __init__(self, process: subprocess.Popen[str], host: str, port: int, log_path: Path) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log_path = log_path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        """The server's stderr so far (removed by :meth:`stop`)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> Response:
        """One HTTP request on a fresh connection. ``body``: bytes as is, anything else as JSON."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
            all_headers = {"Content-Type": "application/json"} if data is not None else {}
            all_headers.update(headers or {})
            connection.request(method, path, body=data, headers=all_headers)
            response = connection.getresponse()
            return Response(response.status, dict(response.getheaders()), response.read())
        finally:
            connection.close()

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples as ``{'name{labels}': value}``, parsed by prometheus_client's own
        parser, without the ``model_name`` label every series carries (the served model's)."""
        response = self.request("GET", "/metrics")
        assert response.status == 200, response.body
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                labels = ",".join(
                    f'{name}="{value}"' for name, value in sample.labels.items() if name != "model_name"
                )
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the server (and anything it started) and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The server runs in its own process group: kill whatever is left of it (workers included).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        status = self.process.wait()
        self.log_path.unlink(missing_ok=True)
        return status


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = {name.lower(): value for name, value in headers.items()}
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def start_server(
    model_dir: Path | str | None, *flags: str, timeout: float = 180, command_prefix: Sequence[str] = ()
) -> ServerProcess:
    """``pied serve`` on a free port; ``model_dir=None`` serves the bundled default (no --model).
    ``command_prefix``: what runs the command (a wrapper that drops privileges, say)."""
    log = tempfile.NamedTemporaryFile("w+", prefix="pied-serve-", suffix=".log", delete=False)
    model = [] if model_dir is None else ["--model", str(model_dir)]
    command = [
        *command_prefix, sys.executable, "-m", "pied", "serve", *model,
        "--host", "127.0.0.1", "--port", "0", *flags,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,  # its own process group, so stop() can kill every worker too
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    found: dict[str, str] = {}
    ready = threading.Event()

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            match = LISTENING.search(line)
            if match and not found:
                found.update(match.groupdict())
                ready.set()
        ready.set()  # stdout closed: the server exited

    threading.Thread(target=read_stdout, daemon=True).start()
    server = ServerProcess(process, "127.0.0.1", 0, Path(log.name))
    if not ready.wait(timeout) or not found:
        log = server.log()
        server.stop(signal.SIGKILL)
        raise RuntimeError(f"pied serve did not start (status {process.poll()}):\n{log[-4000:]}")
    server.host, server.port = found["host"], int(found["port"])
    deadline = time.monotonic() + 30
    while True:
        try:
            if server.request("GET", "/health", timeout=5).status == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            log = server.log()
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"pied serve never became healthy:\n{log[-4000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(model_dir: Path | str, *flags: str) -> Iterator[ServerProcess]:
    server = start_server(model_dir, *flags)
    try:
        yield server
    finally:
        server.stop()


def openai_client(server: ServerProcess, timeout: float = 60) -> Any:
    """The official ``openai`` client for ``server`` (no retries: a test sees every failure)."""
    import openai

    return openai.OpenAI(base_url=server.url("/v1"), api_key="none", max_retries=0, timeout=timeout)


def api_server_fixtures(
    served_model_name: str, *flags: str, max_model_len: int = 128, timeout: float = 60
) -> tuple[Any, Any]:
    """Module-scoped ``server`` and ``client`` fixtures: one ``pied serve`` of the tiny Llama, served
    as ``served_model_name`` with a ``max_model_len``-token context (plus ``flags``), and the
    ``openai`` client for it (``timeout`` seconds a request), for the module's tests. At a test
    module's top level: ``server, client = api_server_fixtures(MODEL)``."""

    @pytest.fixture(scope="module")
    def server(tiny_model_dir) -> Iterator[ServerProcess]:
        model_dir = tiny_model_dir("llama")
        context = ("--max-model-len", str(max_model_len))
        with running_server(model_dir, "--served-model-name", served_model_name, *context, *flags) as process:
            yield process

    @pytest.fixture(scope="module")
    def client(server: ServerProcess) -> Any:
        return openai_client(server, timeout)

    return server, client


def sse_events(body: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body: parsed JSON, or the string ``[DONE]``."""
    events = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


class EventStream:
    """A streaming request read event by event, so a test can act (disconnect, kill a worker,
    send a signal) while the response is still coming."""

    def __init__(
        self,
        server: ServerProcess,
        path: str,
        body: Any,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> None:
        self.connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
        self.connection.request(
            "POST",
            path,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        self.response = self.connection.getresponse()  # returns once the status line and headers arrived
        self.status = self.response.status

    def next_event(self) -> Any:
        """The next ``data:`` payload (parsed JSON or ``"[DONE]"``); None at the end of the body."""
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.strip()
            if line.startswith(b"data: "):
                data = line[len(b"data: ") :].decode()
                return data if data == "[DONE]" else json.loads(data)

    def rest(self) -> list[Any]:
        events = []
        while (event := self.next_event()) is not None:
            events.append(event)
            if event == "[DONE]":
                break
        return events

    def close(self) -> None:
        """Disconnect (the server sees the connection drop)."""
        sock = self.connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()


# ---------------------------------------------------------------- streamed responses


def choice_text(path: str, choice: dict, streamed: bool) -> str:
    if path == "/v1/completions":
        return choice["text"]
    return (choice["delta"] if streamed else choice["message"]).get("content") or ""


async def read_stream(session: Any, url: str, path: str, body: dict) -> tuple[str, str]:
    """(text, finish_reason) of one streamed request, checking the SSE framing on the way."""
    text, finish = "", None
    async with session.post(url + path, json=body) as response:
        assert response.status == 200, await response.text()
        done = False
        async for raw in response.content:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            assert not done, "data after [DONE]"
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice_text(path, choice, streamed=True)
                finish = choice["finish_reason"] or finish
        assert done, "the stream ended without [DONE]"
    assert finish is not None
    return text, finish
