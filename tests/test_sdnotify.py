"""sd_notify: the Notifier on its own, the systemd unit file, and a real ``pied serve`` talking to a
stand-in notify socket: STATUS and EXTEND_TIMEOUT_USEC while loading, READY=1 once serving,
WATCHDOG=1 pings that pause while a worker is stopped and resume after, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from daemon import NotifySocket, worker_pids
from server import start_server

from pied.sdnotify import Notifier, socket_address

UNIT_FILE = Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "pied.service"
WATCHDOG_USEC = 400_000  # a ping every 0.2 s


# ---------------------------------------------------------------- the Notifier


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@pied/notify") == "\0pied/notify"
    assert socket_address("") is None
    assert socket_address("vsock:2:1234") is None  # a VM's service manager: not spoken


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram(tmp_path: Path, abstract: bool) -> None:
    listener = NotifySocket(tmp_path, abstract=abstract)
    try:
        notifier = Notifier(listener.environment)
        assert notifier.enabled and notifier.watchdog_interval is None
        assert notifier.ready("Serving\nthe model")  # a newline would start a bogus assignment
        assert notifier.extend_timeout(2.5)
        listener.wait_for("READY", "1", timeout=5)
        listener.wait_for("EXTEND_TIMEOUT_USEC", "2500000", timeout=5)
        assert listener.values("STATUS") == ["Serving the model"]
    finally:
        listener.close()


def test_no_socket_means_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.notify("READY=1")
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).notify("READY=1") is False


def test_watchdog_interval_is_half_the_timeout_and_only_for_us(tmp_path: Path) -> None:
    environment = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "30000000"}
    assert Notifier(environment).watchdog_interval == 15.0
    assert Notifier({**environment, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier({**environment, "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


async def test_watchdog_pings_only_while_healthy(tmp_path: Path) -> None:
    listener = NotifySocket(tmp_path)
    try:
        notifier = Notifier({**listener.environment, "WATCHDOG_USEC": "100000"})
        healthy = True
        task = asyncio.ensure_future(notifier.run_watchdog(lambda: healthy))
        await asyncio.sleep(0.5)
        healthy = False
        await asyncio.sleep(0.1)  # a ping may be on its way
        pings_while_healthy = len(listener.times("WATCHDOG"))
        await asyncio.sleep(0.5)
        assert len(listener.times("WATCHDOG")) == pings_while_healthy
        healthy = True
        await asyncio.sleep(0.4)
        task.cancel()
        assert pings_while_healthy >= 5
        assert len(listener.times("WATCHDOG")) > pings_while_healthy
    finally:
        listener.close()


# ---------------------------------------------------------------- the unit file


def test_unit_file_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists; pied is not installed in /usr/bin here.
    unit = tmp_path / "pied.service"
    unit.write_text(
        UNIT_FILE.read_text().replace("ExecStart=/usr/bin/pied ", f"ExecStart={shutil.which('true')} ")
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are only warnings: any line about our unit is a failure.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "pied.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr

    text = UNIT_FILE.read_text()
    for setting in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "KillMode=mixed",
        "LimitMEMLOCK=infinity",
        "LimitCORE=0",
        "ProtectProc=invisible",
        "SystemCallFilter=@system-service mincore",
        "RuntimeDirectory=pied",
        "RuntimeDirectoryMode=0700",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateDevices=no",
        "DeviceAllow=/dev/nvidia-uvm rw",
        "ExecStart=/usr/bin/pied serve --config /etc/pied/pied.toml",
    ):
        assert re.search(rf"^{re.escape(setting)}$", text, re.MULTILINE), setting
    # TimeoutStopSec must cover the drain (shutdown-timeout in the example config) and stopping.
    stop_seconds = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.MULTILINE).group(1))
    config = (UNIT_FILE.parent.parent / "pied.toml").read_text()
    drain_seconds = float(re.search(r"^shutdown-timeout = ([\d.]+)$", config, re.MULTILINE).group(1))
    assert stop_seconds >= drain_seconds + 20

    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout + security.stderr)
    if security.returncode == 0 and exposure:  # --offline needs systemd 250
        assert float(exposure.group(1)) <= 3.0, security.stdout


# ---------------------------------------------------------------- a real daemon


def test_daemon_notifies_systemd(tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listener = NotifySocket(tmp_path, abstract=True)
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    # A long heartbeat timeout: the stopped executor below must not be declared dead meanwhile.
    server = start_server(tiny_model_dir("llama"), "--heartbeat-timeout", "60")
    executor = None
    try:
        ready = listener.wait_for("READY", "1", timeout=10)
        assert any(t < ready for t in listener.times("EXTEND_TIMEOUT_USEC"))
        loading = [s for s in listener.values("STATUS") if s.startswith("Loading")]
        assert loading, listener.messages
        ready_status = [fields.get("STATUS", "") for _, fields in listener.messages if "READY" in fields]
        assert ready_status[0].startswith("Serving"), ready_status
        listener.wait_for("STATUS", timeout=5, after=ready)  # the serving status: load and KV use

        workers = worker_pids(server.process.pid)
        assert workers, "no worker processes"
        for pid in workers.values():  # only the daemon talks to systemd
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(item.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for item in environment)

        deadline = time.monotonic() + 10
        while len(pings := listener.times("WATCHDOG", "1")) < 5:
            assert time.monotonic() < deadline, f"too few watchdog pings: {pings}"
            time.sleep(0.05)
        # Periodic at WATCHDOG_USEC / 2: the median gap, so one late tick on a loaded machine
        # does not decide the test.
        assert statistics.median(b - a for a, b in zip(pings, pings[1:])) < 0.3

        # A stopped worker sends no heartbeats: the pings pause (well before it counts as dead).
        executor = workers["executor"]
        os.kill(executor, signal.SIGSTOP)
        stopped = time.monotonic()
        deadline = stopped + 6
        while True:
            time.sleep(0.1)
            last = max(listener.times("WATCHDOG", "1"))
            if time.monotonic() - last > 1.5:
                break
            assert time.monotonic() < deadline, "the watchdog pings went on while the executor was stopped"
        paused_after = last - stopped
        assert paused_after < 4, paused_after
        assert server.process.poll() is None
        assert server.request("GET", "/health").status == 200  # not dead: only unhealthy

        os.kill(executor, signal.SIGCONT)
        resumed = listener.wait_for("WATCHDOG", "1", timeout=3, after=time.monotonic())
        print(f"pings paused {paused_after:.2f} s after SIGSTOP, resumed {resumed - stopped:.2f} s after it")

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        stopping = listener.wait_for("STOPPING", "1", timeout=1)
        assert stopping > ready
    finally:
        if executor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(executor, signal.SIGCONT)
        server.stop()
        listener.close()
