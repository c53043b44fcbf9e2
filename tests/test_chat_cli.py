"""``pied chat`` in a pseudo-terminal against a real ``pied serve`` running the bundled model: a
typed question gets a streamed reply, Ctrl-C stops a reply and leaves the program at its prompt,
a server error is shown and the session goes on, ``/exit`` quits."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from server import REPO, ServerProcess, start_server

PROMPT = re.compile(rb"(?:^|\n)> $")
# The child becomes a session leader whose controlling terminal is the pty (what login_tty does),
# so that ^C typed into the pty is turned into SIGINT for it by the terminal driver.
TAKE_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class Terminal:
    """A process on a pseudo-terminal: type into it, wait for what it prints."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-c", TAKE_TERMINAL, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, "TERM": "dumb"},  # no bracketed-paste or color escapes from readline
        )
        os.close(slave)
        self.master = master
        self.output = b""
        self.seen = 0  # output before this offset has been matched already

    def read_some(self, deadline: float) -> bool:
        """Read what is there (waiting until ``deadline``); False once the child closed the terminal."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every end of the terminal's child side is closed
            return False
        self.output += data.replace(b"\r\n", b"\n")
        return bool(data)

    def expect(self, pattern: re.Pattern[bytes] | bytes, timeout: float = 60) -> bytes:
        """Wait for ``pattern`` in the output not matched yet; return the output up to its end."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.seen)
            if match:
                before = self.output[self.seen : match.end()]
                self.seen = match.end()
                return before
            if time.monotonic() > deadline:
                raise AssertionError(f"no {regex.pattern!r} within {timeout}s; output:\n{self.text()}")
            if not self.read_some(deadline):
                raise AssertionError(f"pied chat exited ({self.process.wait()}):\n{self.text()}")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait(self, timeout: float = 20) -> int:
        """The exit status, once the child is gone (reading its last words meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.read_some(deadline):
            pass
        return self.process.wait(timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        os.close(self.master)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # One torch thread in the server's processes: see tests/test_default_model.py's llm fixture.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        process = start_server(None)  # the quickstart's: no --model, the bundled default
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def chat(server: ServerProcess, *flags: str) -> Iterator[Terminal]:
    terminal = Terminal("-m", "pied", "chat", "--url", server.base_url, *flags)
    try:
        yield terminal
    finally:
        terminal.close()


def reply_after(terminal: Terminal, question: str) -> str:
    """Type a question and return everything printed for it, up to the next prompt."""
    terminal.type(question + "\r")
    terminal.expect(question.encode() + b"\n")  # the terminal's echo of what was typed
    return terminal.expect(PROMPT).decode(errors="replace").removesuffix("> ")


def test_chat_streams_replies_and_ctrl_c_stops_one(server: ServerProcess) -> None:
    with chat(server, "--max-tokens", "400") as terminal:  # chat's default temperature, 0.7
        terminal.expect(PROMPT)
        reply = reply_after(terminal, "What does len do?")
        assert sum(ch.isalpha() for ch in reply) >= 5, reply

        # Stop a reply as soon as its first words arrive. A sampled reply can be a dozen tokens, all
        # sent before ^C lands on a busy machine; then ^C meets the prompt instead: ask again.
        for _ in range(5):
            terminal.type("Tell me more.\r")
            terminal.expect(b"Tell me more.\n")
            terminal.expect(re.compile(rb"[A-Za-z]{2}"))
            terminal.type("\x03")
            outcome = terminal.expect(re.compile(rb"\[reply stopped\]|Ctrl-C again"))
            terminal.expect(PROMPT)
            if outcome.endswith(b"[reply stopped]"):
                break
        else:
            raise AssertionError(f"no reply was long enough to stop:\n{terminal.text()}")
        # Closing the connection is what stops generation on the server.
        deadline = time.monotonic() + 10
        while server.metrics()['pied:request_success_total{finished_reason="abort"}'] < 1:
            assert time.monotonic() < deadline, "the server never aborted the stopped reply"
            time.sleep(0.05)

        # Still at the prompt and still talking to the server.
        assert sum(ch.isalpha() for ch in reply_after(terminal, "Tell me about lists")) >= 5

        # Ctrl-C at the prompt only warns; /exit quits.
        terminal.type("\x03")
        try:
            terminal.expect(b"Ctrl-C again", timeout=5)
        except AssertionError:
            # NOTE: CPython's input() acts on a SIGINT only when it interrupts the blocking read; one
            # that lands between the prompt's write and the read waits for the next key (seen once
            # in CI). Enter delivers it; a ^C that was never delivered prints nothing and fails here.
            terminal.type("\r")
            terminal.expect(b"Ctrl-C again")
        terminal.type("/exit\r")
        assert terminal.wait() == 0, terminal.text()


def test_the_quickstart_request_is_answered(server: ServerProcess) -> None:
    # The README's curl, word for word: the bundled model is served as "default".
    assert [model["id"] for model in server.request("GET", "/v1/models").json()["data"]] == ["default"]
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell me about lists"}], "max_tokens": 8}
    response = server.request("POST", "/v1/chat/completions", body)
    assert response.status == 200, response.body
    reply = response.json()
    assert reply["model"] == "default" and reply["choices"][0]["message"]["role"] == "assistant"


def test_chat_shows_server_errors_and_goes_on(server: ServerProcess) -> None:
    with chat(server, "--model", "no-such-model") as terminal:
        terminal.expect(PROMPT)
        error = reply_after(terminal, "Hello?")
        assert "server error 404" in error and "no-such-model" in error, error
        terminal.type("\x04")  # Ctrl-D: end of input quits too
        assert terminal.wait() == 0, terminal.text()


def test_chat_without_a_server_says_so() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pied", "chat", "--url", "http://127.0.0.1:9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot reach the server at http://127.0.0.1:9" in result.stderr
