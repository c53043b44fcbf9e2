"""Helpers for the tests of ``pied serve`` as a daemon: a stand-in for systemd's notify socket, and
views of /proc and /dev/shm to tell which processes and shared memory a daemon left behind."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path


class NotifySocket:
    """An AF_UNIX datagram socket in place of systemd's ``$NOTIFY_SOCKET``: records every
    notification as ``(arrival time, {KEY: VALUE})``. ``abstract`` binds ``@name`` (Linux abstract
    namespace) instead of a path in ``directory``."""

    def __init__(self, directory: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"pied-test-notify-{uuid.uuid4().hex[:12]}"
        if abstract:
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = directory / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    @property
    def environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address}

    def times(self, key: str, value: str | None = None) -> list[float]:
        """When each message carrying ``key`` (``=value``, if given) arrived."""
        with self._lock:
            return [t for t, fields in self.messages if key in fields and value in (None, fields[key])]

    def values(self, key: str) -> list[str]:
        with self._lock:
            return [fields[key] for _, fields in self.messages if key in fields]

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 60.0, after: float = 0.0
    ) -> float:
        """The arrival time of the first such message after ``after``; raises after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [t for t in self.times(key, value) if t > after]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.messages}")
            time.sleep(0.02)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(1)
        self.sock.close()


# ---------------------------------------------------------------- /proc and /dev/shm


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces; fields after it are fixed.
    return stat[stat.rindex(")") + 2 :].split()


def cmdline(pid: int) -> list[str]:
    try:
        return [
            arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ]
    except OSError:
        return []


def live_pids() -> list[int]:
    """Every process that exists and is not a zombie."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] not in "ZX":
                pids.append(int(entry))
    return pids


def is_gone(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in "ZX"


def worker_pids(parent: int) -> dict[str, int]:
    """The worker processes of the daemon ``parent`` by name (``-m workers.executor`` -> executor)."""
    workers = {}
    for pid in live_pids():
        fields = _stat_fields(pid)
        if fields is None or int(fields[1]) != parent:
            continue
        command = cmdline(pid)
        for i, arg in enumerate(command[:-1]):
            if arg == "-m" and command[i + 1].startswith("workers."):
                workers[command[i + 1].split(".", 1)[1]] = pid
    return workers


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (workers carry their runtime
    directory's socket paths in theirs)."""
    return [pid for pid in live_pids() if pid != os.getpid() and any(text in arg for arg in cmdline(pid))]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid has exited; returns the ones still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if not is_gone(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def shm_entries() -> set[str]:
    """Names in /dev/shm that pied would have made (it uses memfds, so none should ever exist)."""
    try:
        return {name for name in os.listdir("/dev/shm") if "pied" in name}
    except FileNotFoundError:
        return set()
