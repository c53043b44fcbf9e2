"""``pied serve`` as a daemon: the ``--config`` TOML file (every flag a key, flags win, unknown keys
are clear errors), the API key from a file, and SIGTERM: requests in flight finish with their full
output, new ones get 503, the exit status is 0; past ``--shutdown-timeout`` what is left is
aborted; a second SIGTERM stops at once; a worker dying during the drain still fails the exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon import worker_pids
from server import REPO, EventStream, ServerProcess, start_server

from pied import config_file
from pied.cli import build_parser, main

EXAMPLE_CONFIG = REPO / "packaging" / "pied.toml"
PROMPTS = ["The class statement defines", "A lambda expression", "The while loop"]
API_KEY = "key-from-a-file"


def serve_parser():
    parser = build_parser()
    return next(action for action in parser._actions if action.dest == "command").choices["serve"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def completion(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


def finish_reasons(events: list[Any]) -> list[str]:
    return [c["finish_reason"] for e in events if e != "[DONE]" for c in e["choices"] if c["finish_reason"]]


def streamed_text(events: list[Any]) -> str:
    return "".join(c["text"] for e in events if e != "[DONE]" for c in e["choices"])


def wait_draining(server: ServerProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.request("GET", "/health").status == 200:
        assert time.monotonic() < deadline, "/health never reported draining"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def long_model(tiny_model_dir) -> Path:
    # A long context, so a generation outlasts the signals below by far.
    return tiny_model_dir("llama", max_position_embeddings=4096)


# ---------------------------------------------------------------- the config file


def test_every_flag_is_a_key_and_the_example_documents_them() -> None:
    parser = serve_parser()
    config_file.check_parser(parser)  # every option defaults to None, so a file value can apply
    assert config_file.load(parser, EXAMPLE_CONFIG)  # the example as shipped loads
    # Uncommented, every "#key = value" line of the example is a valid setting too.
    text = re.sub(r"^#(?=[a-z-]+ = )", "", EXAMPLE_CONFIG.read_text(), flags=re.MULTILINE)
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as file:
        file.write(text)
        file.flush()
        documented = config_file.load(parser, file.name)
    keys = {action.dest for action in config_file.options_by_key(parser).values()}
    assert keys <= set(documented), f"packaging/pied.toml does not document {sorted(keys - set(documented))}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("max-num-seq = 4\n", "unknown key 'max-num-seq' (did you mean 'max-num-seqs'?)"),
        ("port = '8000'\n", "port must be an integer, not a string ('8000')"),
        ("inproc = 1\n", "inproc must be true or false"),
        ("max-n = 2\nmax_n = 3\n", "'max_n' and 'max-n' set the same option"),
        ("[server]\nport = 1\n", "[server] is a table"),
        ("port = \n", "not valid TOML"),
        ("config = 'other.toml'\n", "unknown key 'config'"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, capsys, text: str, message: str) -> None:
    path = write(tmp_path / "pied.toml", text)
    assert main(["serve", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and message in error, error


def test_unknown_key_stops_the_daemon_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "pied.toml", "port = 8000\nmax-tokens = 16\n")
    result = subprocess.run(
        [sys.executable, "-m", "pied", "serve", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"pied: {path}: unknown key 'max-tokens'" in result.stderr, result.stderr


def test_config_file_keys_apply_and_flags_win(tiny_model_dir, tmp_path: Path) -> None:
    key_file = write(tmp_path / "api-key", API_KEY + "\n")
    key_file.chmod(0o600)
    config = write(
        tmp_path / "pied.toml",
        f"""
model = "/nonexistent/model"     # the command line's --model wins
port = 1                         # and its --port 0
served-model-name = "from-file"
api-key-file = "{key_file}"
max_stop_strings = 1             # underscores work too
max-n = 2                        # --max-n 3 below wins
shutdown-timeout = 5
enable-chunked-prefill = true
""",
    )
    server = start_server(tiny_model_dir("llama"), "--config", str(config), "--max-n", "3")
    try:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert server.request("GET", "/v1/models").status == 401
        models = server.request("GET", "/v1/models", headers=auth)
        assert models.status == 200 and [m["id"] for m in models.json()["data"]] == ["from-file"]

        ok = server.request("POST", "/v1/completions", completion(PROMPTS[0], 2, n=3), headers=auth)
        assert ok.status == 200 and len(ok.json()["choices"]) == 3
        too_many = server.request("POST", "/v1/completions", completion(PROMPTS[0], 2, n=4), headers=auth)
        assert too_many.status == 400 and too_many.json()["error"]["param"] == "n"
        assert "at most 3" in too_many.json()["error"]["message"]
        stops = server.request(
            "POST", "/v1/completions", completion(PROMPTS[0], 2, stop=["a", "b"]), headers=auth
        )
        assert stops.status == 400 and stops.json()["error"]["param"] == "stop"
    finally:
        assert server.stop() == 0


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_lets_requests_in_flight_finish(long_model: Path) -> None:
    # A drain long enough for 150 tokens on a loaded shared machine: what is tested is that the
    # requests finish, not how fast (the drain's deadline has its own test below).
    server = start_server(long_model, "--shutdown-timeout", "300")
    try:
        # Each request alone first: greedy, so the drained answers must be exactly these.
        max_tokens = 150
        expected = []
        for prompt in PROMPTS:
            response = server.request("POST", "/v1/completions", completion(prompt, max_tokens))
            assert response.status == 200, response.text
            expected.append(response.json()["choices"][0]["text"])

        streams = [
            EventStream(server, "/v1/completions", completion(p, max_tokens, stream=True))
            for p in PROMPTS[:2]
        ]
        first_events = [stream.next_event() for stream in streams]
        full: dict[str, Any] = {}
        non_streaming = threading.Thread(
            target=lambda: full.update(
                response=server.request("POST", "/v1/completions", completion(PROMPTS[2], max_tokens))
            )
        )
        non_streaming.start()
        deadline = time.monotonic() + 10
        # All three running in the engine (a fast machine may finish the streams' 150 tokens before
        # the third is scheduled, and the third before the drain: then less is left to drain).
        while server.metrics()["pied:num_requests_running"] < 3 and "response" not in full:
            assert time.monotonic() < deadline, "the third request never started"
            time.sleep(0.01)

        server.process.send_signal(signal.SIGTERM)
        wait_draining(server)
        refused = server.request("POST", "/v1/completions", completion(PROMPTS[0], 1))
        assert refused.status == 503 and refused.json()["error"]["type"] == "ServiceUnavailableError"

        for stream, first, text in zip(streams, first_events, expected):
            events = [first, *stream.rest()]
            assert events[-1] == "[DONE]"
            assert finish_reasons(events) == ["length"]
            assert streamed_text(events) == text
        non_streaming.join(300)
        choice = full["response"].json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (expected[2], "length")
        assert server.process.wait(300) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: a closed terminal
def test_shutdown_timeout_aborts_what_is_left(long_model: Path, signum: signal.Signals) -> None:
    server = start_server(long_model, "--shutdown-timeout", "1")
    try:
        stream = EventStream(server, "/v1/completions", completion(PROMPTS[0], 4000, stream=True))
        assert stream.next_event()["choices"]
        signalled = time.monotonic()
        server.process.send_signal(signum)
        events = stream.rest()
        ended = time.monotonic() - signalled
        assert events[-1] == "[DONE]" and finish_reasons(events) == ["abort"]
        assert 0.9 < ended < 5, ended
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_second_sigterm_stops_at_once(long_model: Path) -> None:
    server = start_server(long_model, "--drain-timeout", "120")  # the old name of --shutdown-timeout
    try:
        stream = EventStream(server, "/v1/completions", completion(PROMPTS[0], 4000, stream=True))
        assert stream.next_event()["choices"]
        server.process.send_signal(signal.SIGTERM)
        wait_draining(server)
        again = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 0
        stopped_after = time.monotonic() - again
        assert stopped_after < 5, stopped_after
        events = stream.rest()
        assert finish_reasons(events) == ["abort"]
    finally:
        server.stop()


def test_worker_dying_while_draining_means_a_failed_exit(long_model: Path) -> None:
    server = start_server(long_model, "--shutdown-timeout", "60")
    try:
        stream = EventStream(server, "/v1/completions", completion(PROMPTS[0], 4000, stream=True))
        assert stream.next_event()["choices"]
        server.process.send_signal(signal.SIGTERM)
        wait_draining(server)
        os.kill(worker_pids(server.process.pid)["executor"], signal.SIGKILL)
        events = stream.rest()
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503
        assert server.process.wait(30) == 1
    finally:
        server.stop()
