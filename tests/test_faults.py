"""Faults under load: each worker in turn is killed (SIGKILL) or stopped (SIGSTOP, so it hangs)
while clients stream and wait for full answers. Every client gets a response or an error (none
hangs), the daemon exits non-zero, nothing of it is left (processes, runtime directory, /dev/shm),
and the daemon started again on the same port serves again.

The workers come from ``pied.supervisor.WORKER_NAMES``: a new worker process is faulted too
without any change here."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from daemon import is_gone, processes_mentioning, shm_entries, wait_gone, worker_pids
from server import ServerProcess, start_server

from pied.supervisor import WORKER_NAMES

NUM_CLIENTS = 12
MAX_TOKENS = 300  # long enough that the fault lands while every client is mid-request
CLIENT_TIMEOUT = 30.0  # a request not answered by then counts as hung
HEARTBEAT_TIMEOUT = "2"  # a stopped worker is declared dead after 2 s


def request_for(client: int) -> tuple[str, dict]:
    """Streaming and full-answer requests, completions and chat, in turn."""
    common = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": client % 3 != 2}
    if client % 2:
        return "/v1/chat/completions", {
            **common,
            "messages": [{"role": "user", "content": f"Client {client}"}],
        }
    return "/v1/completions", {**common, "prompt": f"The client number {client} says"}


async def one_request(session: aiohttp.ClientSession, base_url: str, client: int) -> str:
    """How one request ended: ``complete``, ``error`` (an error event or an error status), ``closed``
    (the connection dropped: the daemon is gone) or ``hung``."""
    path, body = request_for(client)
    try:
        async with session.post(base_url + path, json=body) as response:
            if response.status != 200:
                error = (await response.json())["error"]
                assert response.status == 503 and error["code"] == 503, (response.status, error)
                return "error"
            if not body["stream"]:
                payload = await response.json()
                assert payload["choices"][0]["finish_reason"] == "length", payload
                return "complete"
            outcome = "closed"  # unless [DONE] comes
            async for raw in response.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    return outcome if outcome != "closed" else "complete"
                if line.startswith("data: ") and "error" in json.loads(line[6:]):
                    assert json.loads(line[6:])["error"]["code"] == 503, line
                    outcome = "error"
            return "closed"
    except asyncio.TimeoutError:
        return "hung"
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        return "closed"


async def load_then_fault(server: ServerProcess, worker_pid: int, sig: signal.Signals) -> collections.Counter:
    """Clients send requests back to back; once all are generating, ``sig`` goes to the worker.
    Each client stops at its first request that did not complete."""
    outcomes: collections.Counter[str] = collections.Counter()
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def client(index: int) -> None:
            while True:
                outcome = await one_request(session, server.base_url, index)
                outcomes[outcome] += 1
                if outcome != "complete":
                    return

        clients = [asyncio.ensure_future(client(i)) for i in range(NUM_CLIENTS)]
        deadline = time.monotonic() + 30
        while server.metrics()["pied:num_requests_running"] < NUM_CLIENTS:
            assert time.monotonic() < deadline, "the clients never all got going"
            await asyncio.sleep(0.05)
        os.kill(worker_pid, sig)
        await asyncio.wait_for(asyncio.gather(*clients), 2 * CLIENT_TIMEOUT)
    return outcomes


def assert_serves(server: ServerProcess) -> None:
    response = server.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert response.status == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
def test_each_worker_fault_under_load(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    runtime_parent = tmp_path / "run"  # as under systemd (RuntimeDirectory=): where sockets go
    runtime_parent.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime_parent))
    shm_before = shm_entries()
    model = tiny_model_dir("llama", max_position_embeddings=1024)
    port = 0
    for worker in [*WORKER_NAMES, None]:  # None: the last restart only has to serve
        server = start_server(model, "--port", str(port), "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
        pids: dict[str, int] = {}
        try:
            assert port in (0, server.port)  # a restart binds the same port again
            port = server.port
            assert_serves(server)
            if worker is None:
                assert server.stop() == 0
                break
            pids = worker_pids(server.process.pid)
            assert set(pids) == set(WORKER_NAMES), pids

            faulted_at = time.monotonic()
            outcomes = asyncio.run(load_then_fault(server, pids[worker], sig))
            print(f"{sig.name} {worker}: {dict(outcomes)} in {time.monotonic() - faulted_at:.1f} s")
            assert outcomes["hung"] == 0, outcomes
            assert outcomes["error"] + outcomes["closed"] >= NUM_CLIENTS, outcomes

            status = server.process.wait(30)
            assert status != 0, f"the daemon exited {status} after its {worker} got {sig.name}"
            assert "the engine died" in server.log() and worker in server.log()
            left = wait_gone([server.process.pid, *pids.values()], 10)
            assert not left, f"processes left after the daemon exited: {left}"
            assert processes_mentioning(str(runtime_parent)) == []
            assert list(runtime_parent.iterdir()) == [], "the runtime directory was not removed"
            assert shm_entries() - shm_before == set()
        finally:
            for pid in pids.values():  # never leave a stopped process behind a failed assertion
                if not is_gone(pid):
                    os.kill(pid, signal.SIGCONT)
            server.stop(signal.SIGKILL)
