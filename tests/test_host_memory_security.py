"""Host memory hygiene (DESIGN.md "Host memory hygiene", issue 17): host KV segments are sealed
memfds whose descriptors reach the executor over a Unix socket (SCM_RIGHTS), the workers and the
daemon are non-dumpable, no other process of the user reaches a worker's /proc, nothing is left
after a worker is killed; and (issue 14) each segment is registered with CUDA once, the CUDA
runtime injected here so the logic runs on CPU.

The end-to-end tests run the daemon and the probe with every capability dropped (the same uid, no
CAP_SYS_PTRACE), as a same-user attacker would be: the old ``/proc/<pid>/fd`` path would fail there.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from daemon import is_gone, wait_gone, worker_pids
from engine_driver import mapped_segments, open_memfds
from server import REPO, start_server

import proto
from workers.executor.host_kv import HostKV
from workers.executor.host_registration import REGISTER_FLAGS, HostRegistrar
from workers.fd_channel import FdChannelError, FdClient, FdServer
from workers.memory.host_pool import SEALS, HostSegment, KVLayout, local_segment_fds

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
BLOCKS_PER_SEGMENT = 4

# Runs argv[1:] with an empty capability bounding set: a root process then execs with no
# capabilities at all, like any other process of its user.
DROP_CAPABILITIES = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
last = int(open("/proc/sys/kernel/cap_last_cap").read())
for cap in range(last + 1):
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
os.execv(sys.argv[1], sys.argv[1:])
"""
WITHOUT_CAPABILITIES = [sys.executable, "-c", DROP_CAPABILITIES]

# Opens each path given; prints {path: "opened" | errno}. First a positive control: a memfd of a
# child of the probe (dumpable, same credentials) is reachable through /proc, so a refusal below is
# the target's doing, not the probe's.
PROBE = """
import json, os, subprocess, sys
holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
    "print(os.memfd_create('control'), flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
paths = [f"/proc/{holder.pid}/fd/{int(holder.stdout.readline())}", *sys.argv[1:]]
results = {}
for path in paths:
    try:
        os.close(os.open(path, os.O_RDONLY))
        results[path] = "opened"
    except OSError as error:
        results[path] = error.errno
holder.kill()
print(json.dumps(results))
"""


def segment_info(segment_id: int) -> tuple[int, int]:
    return segment_id * BLOCKS_PER_SEGMENT, BLOCKS_PER_SEGMENT


def make_segments(count: int) -> list[HostSegment]:
    return [HostSegment.create(i, *segment_info(i), LAYOUT) for i in range(count)]


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


# ---------------------------------------------------------------- sealing


def test_segments_are_sealed_at_their_exact_size() -> None:
    segment = HostSegment.create(0, 0, BLOCKS_PER_SEGMENT, LAYOUT)
    try:
        fd = segment.fd
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        assert os.fstat(fd).st_size == BLOCKS_PER_SEGMENT * LAYOUT.block_bytes
        for size in (0, LAYOUT.block_bytes, 2 * segment.num_bytes):  # shrink, shrink, grow
            with pytest.raises(PermissionError) as refused:
                os.ftruncate(fd, size)
            assert refused.value.errno == errno.EPERM
        with pytest.raises(PermissionError):  # and the seals cannot be lifted or changed
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert os.fstat(fd).st_size == segment.num_bytes
        segment.tensor.fill_(1.5)  # still writable memory
    finally:
        segment.close()


def test_a_mapper_refuses_an_unsealed_or_misfit_segment_and_closes_its_descriptor() -> None:
    info = proto.HostSegmentInfo(0, os.getpid(), 99, 0, BLOCKS_PER_SEGMENT)
    unsealed = os.memfd_create("pied-kv-test", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, BLOCKS_PER_SEGMENT * LAYOUT.block_bytes)
    with pytest.raises(ValueError, match="not sealed"):
        HostSegment.attach(info, LAYOUT, unsealed)
    with pytest.raises(OSError):  # closed by attach, even on refusal
        os.fstat(unsealed)
    other = HostSegment.create(0, 0, BLOCKS_PER_SEGMENT - 1, LAYOUT)
    try:
        with pytest.raises(ValueError, match="disagree on the KV layout"):
            HostSegment.attach(info, LAYOUT, os.dup(other.fd))
    finally:
        other.close()


def range_permissions(address: int) -> str | None:
    """The permissions of this process's mapping starting at ``address`` (None: nothing there)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if int(line.split("-", 1)[0], 16) == address:
                return line.split()[1]
    return None


def test_closing_a_segment_lets_its_pages_go_even_under_a_stale_view() -> None:
    segment = HostSegment.create(0, 0, BLOCKS_PER_SEGMENT, LAYOUT)
    address, before = segment.address, mapped_segments()
    stale = segment.tensor[1, 2]  # a view someone forgot (a copy thread's last transfer, say)
    segment.close()
    # The memfd is no longer mapped (its pages are freed), and the range stays reserved and
    # inaccessible while the view lives, so touching it faults instead of reading another allocation.
    assert mapped_segments() == before - 1 and range_permissions(address) == "---p"
    del stale
    assert range_permissions(address) is None  # the last view gone, the range is given back


# ---------------------------------------------------------------- the fd channel, in one process


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop on its own thread, as the memory actor's."""
    event_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=event_loop.run_forever, daemon=True)
    thread.start()
    yield event_loop
    event_loop.call_soon_threadsafe(event_loop.stop)
    thread.join(10)
    event_loop.close()


def on_loop(loop: asyncio.AbstractEventLoop, function, *args):
    return asyncio.run_coroutine_threadsafe(_call(function, *args), loop).result(10)


async def _call(function, *args):
    return function(*args)


def serve_segments(loop: asyncio.AbstractEventLoop, address: str, live: dict[int, HostSegment]) -> FdServer:
    def lookup(segment_id: int, fd: int) -> tuple[int, int] | None:
        segment = live.get(segment_id)
        return None if segment is None or segment.info.fd != fd else (segment.fd, segment.num_bytes)

    server = FdServer(address, lookup)
    on_loop(loop, server.start, loop)
    return server


def test_descriptors_travel_over_the_channel_and_are_closed_once_mapped(loop) -> None:
    address = f"inproc://test-{os.getpid()}-{time.monotonic_ns()}/memory"
    segments = make_segments(3)
    live = {segment.info.segment_id: segment for segment in segments}
    server = serve_segments(loop, address, live)
    client = FdClient(address, timeout=10)
    pages = torch.zeros(4, *LAYOUT.page_shape)
    host_kv = HostKV(LAYOUT, pages, 4, None, BLOCKS_PER_SEGMENT, torch.device("cpu"))
    try:
        # The descriptor that arrives is the segment itself (same memfd inode), sealed.
        fd = client.open(segments[0].info)
        assert fd is not None
        assert os.fstat(fd).st_ino == os.fstat(segments[0].fd).st_ino
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        os.close(fd)

        # The executor maps what it receives and keeps no descriptor.
        before = open_fds()
        host_kv.attach([segments[0].info, segments[1].info], client.open)
        assert open_fds() == before
        segments[1].tensor[1, 2].fill_(7.0)  # the memory manager's view and the executor's are one
        assert torch.all(host_kv.pool.segments[1].tensor[1, 2] == 7.0)

        # Released before the executor got to it: "released", nothing mapped, nothing open.
        released = live.pop(2)
        assert client.open(released.info) is None
        host_kv.attach([released.info], client.open)
        assert set(host_kv.pool.segments) == {0, 1} and open_fds() == before
        # A stale name (the segment id of a live one, another descriptor number): refused too.
        stale = proto.HostSegmentInfo(0, os.getpid(), segments[0].info.fd + 1000, 0, BLOCKS_PER_SEGMENT)
        assert client.open(stale) is None
    finally:
        host_kv.close()
        client.close()
        on_loop(loop, server.close)
        for segment in segments:
            segment.close()
    assert mapped_segments() == 0


def test_the_channel_fails_clearly_and_refuses_other_processes(loop, tmp_path: Path) -> None:
    info = proto.HostSegmentInfo(0, os.getpid(), 3, 0, BLOCKS_PER_SEGMENT)
    with pytest.raises(FdChannelError, match="no memory manager listens"):
        FdClient(f"ipc://{tmp_path}/memory.sock", timeout=0.2).open(info)

    # An in-process channel (actors as threads) is an abstract socket: another process is refused.
    address = f"inproc://test-{os.getpid()}-{time.monotonic_ns()}/memory"
    server = serve_segments(loop, address, {})
    try:
        script = (
            "import sys, proto; from workers.fd_channel import FdClient, FdChannelError\n"
            "try:\n"
            f"    FdClient({address!r}, timeout=10).open(proto.HostSegmentInfo(0, 1, 3, 0, 4))\n"
            "except FdChannelError as error:\n"
            "    print(error)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert "closed the host segment channel" in result.stdout, result.stderr
        # This process is served: the refusal was about the peer.
        assert FdClient(address, timeout=10).open(info) is None
    finally:
        on_loop(loop, server.close)


# ---------------------------------------------------------------- CUDA registration, injected


class FakeCudaRuntime:
    """Records cudaHostRegister/Unregister; ``fail_sizes``: sizes refused with cudaErrorMemoryAllocation."""

    def __init__(self, fail_sizes: tuple[int, ...] = ()) -> None:
        self.fail_sizes = fail_sizes
        self.registered: dict[int, int] = {}
        self.calls: list[tuple] = []

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:  # noqa: N802
        self.calls.append(("register", pointer, size, flags))
        if size in self.fail_sizes:
            return 2
        assert pointer not in self.registered, "registered twice"
        self.registered[pointer] = size
        return 0

    def cudaHostUnregister(self, pointer: int) -> int:  # noqa: N802
        self.calls.append(("unregister", pointer))
        return 0 if self.registered.pop(pointer, None) is not None else 712  # not registered


def test_each_segment_is_registered_once_at_attach_and_unregistered_before_unmap(caplog) -> None:
    small = HostSegment.create(2, 2 * BLOCKS_PER_SEGMENT, BLOCKS_PER_SEGMENT - 1, LAYOUT)  # the last, shorter
    segments = [*make_segments(2), small]
    cudart = FakeCudaRuntime(fail_sizes=(small.num_bytes,))
    registrar = HostRegistrar(torch.device("cpu"), cudart=cudart)
    pages = torch.zeros(4, *LAYOUT.page_shape)
    host_kv = HostKV(LAYOUT, pages, 4, None, BLOCKS_PER_SEGMENT, torch.device("cpu"), registrar=registrar)
    try:
        with caplog.at_level(logging.WARNING):
            host_kv.attach([segment.info for segment in segments], local_segment_fds(segments))
        mapped = host_kv.pool.segments
        # Portable | mapped, the whole segment at its address in the executor, once each.
        assert REGISTER_FLAGS == 0x3
        assert sorted(cudart.calls) == sorted(
            ("register", mapped[i].address, mapped[i].num_bytes, 0x3) for i in range(3)
        )
        assert set(cudart.registered) == {mapped[0].address, mapped[1].address}
        # Refused registration: a warning (naming the fix), the segment still mapped and usable.
        assert [registrar.is_registered(mapped[i]) for i in range(3)] == [True, True, False]
        warnings = [r for r in caplog.records if "cudaHostRegister failed" in r.getMessage()]
        assert len(warnings) == 1 and "LimitMEMLOCK" in warnings[0].getMessage()
        mapped[2].tensor.fill_(3.0)

        host_kv.detach([0])
        assert set(cudart.registered) == {mapped[1].address} and cudart.calls[-1][0] == "unregister"
        cudart.calls.clear()
        host_kv.detach([2])  # never registered: nothing to unregister
        assert cudart.calls == []
    finally:
        host_kv.close()
        for segment in segments:
            segment.close()
    assert cudart.registered == {}  # close unregistered the rest


def test_the_registrar_raises_the_memlock_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if hard != resource.RLIM_INFINITY and hard < 2:
        pytest.skip("the hard memlock limit leaves nothing to raise")
    lowered = 1 if hard == resource.RLIM_INFINITY else hard - 1
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (lowered, hard))
    try:
        registrar = HostRegistrar(torch.device("cpu"), cudart=FakeCudaRuntime())
        assert resource.getrlimit(resource.RLIMIT_MEMLOCK) == (hard, hard)
        assert (registrar.memlock_soft, registrar.memlock_hard) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))


# ---------------------------------------------------------------- non-dumpable processes


@pytest.mark.parametrize("dumpable_env", [None, "1"])
def test_processes_make_themselves_non_dumpable_unless_asked_not_to(dumpable_env: str | None) -> None:
    script = (
        "import resource; from workers.process_security import is_dumpable, make_non_dumpable\n"
        "print(make_non_dumpable(), is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE)[0] == 0)"
    )
    environment = {k: v for k, v in os.environ.items() if k != "PIED_DUMPABLE"}
    if dumpable_env is not None:
        environment["PIED_DUMPABLE"] = dumpable_env
    environment["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    expected = "True False True" if dumpable_env is None else "False True "
    assert result.stdout.startswith(expected), result.stdout


# ---------------------------------------------------------------- end to end, processes


def memfd_inodes(pid: int) -> set[int]:
    """Inodes of the host segments process ``pid`` holds open or has mapped."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:pied-kv"):
                    inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
            except OSError:
                pass
        with open(f"/proc/{pid}/maps") as maps:
            inodes.update(int(line.split()[4]) for line in maps if "/memfd:pied-kv" in line)
    except OSError:
        pass
    return inodes


def holders_of(inodes: set[int]) -> list[int]:
    """Every process that still holds or maps one of ``inodes``."""
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and memfd_inodes(int(pid)) & inodes]


def require_root_with_capabilities() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: to run the daemon and the probe as the same user without capabilities, "
                    "and to inspect the non-dumpable workers meanwhile")  # fmt: skip
    with open("/proc/self/status") as status:
        effective = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    if not effective & (1 << 8) or not effective & (1 << 19):  # CAP_SETPCAP, CAP_SYS_PTRACE
        pytest.skip("needs CAP_SETPCAP (to drop capabilities) and CAP_SYS_PTRACE (to inspect workers)")


def test_host_kv_is_out_of_reach_of_other_processes_of_the_user(tiny_model_dir, monkeypatch) -> None:
    """The daemon without any capability (so /proc/<pid>/fd of a non-dumpable worker is closed to
    its own executor too) serves with host KV; the segments are sealed; the executor holds none
    open; a process of the same user cannot open a worker's descriptors, maps, or the daemon's
    environment; after kill -9 of the memory manager no process holds a segment."""
    require_root_with_capabilities()
    monkeypatch.delenv("PIED_DUMPABLE", raising=False)
    model = tiny_model_dir("llama")
    flags = ("--dtype", "float32", "--block-size", "4", "--device-kv-blocks", "24", "--kv-policy", "pie",
             "--expansion", "fixed:64")  # fmt: skip
    server = start_server(model, *flags, command_prefix=WITHOUT_CAPABILITIES)
    pids: dict[str, int] = {}
    try:
        pids = worker_pids(server.process.pid)
        assert set(pids) == {"memory", "executor", "scheduler"}, pids
        prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)  # more than the device holds
        response = server.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert response.status == 200, response.text
        assert server.metrics()['pied:kv_bytes_transferred_total{direction="host_to_device"}'] > 0

        # Sealed segments, held by the memory manager; the executor maps them and holds no descriptor.
        memory, executor = pids["memory"], pids["executor"]
        fds = [fd for fd in os.listdir(f"/proc/{memory}/fd")
               if os.readlink(f"/proc/{memory}/fd/{fd}").startswith("/memfd:pied-kv")]  # fmt: skip
        assert fds and open_memfds(executor) == 0 and mapped_segments(executor) >= len(fds)
        for fd in fds:
            seg = os.open(f"/proc/{memory}/fd/{fd}", os.O_RDWR)
            try:
                assert fcntl.fcntl(seg, fcntl.F_GET_SEALS) & SEALS == SEALS
                with pytest.raises(PermissionError):
                    os.ftruncate(seg, 0)
                with pytest.raises(PermissionError):
                    os.ftruncate(seg, os.fstat(seg).st_size + 4096)
            finally:
                os.close(seg)

        # Another process of the same user (same uid, no capabilities) reaches none of it.
        targets = [f"/proc/{memory}/fd/{fds[0]}", f"/proc/{executor}/maps", f"/proc/{server.process.pid}/environ"]
        probe = subprocess.run(
            [*WITHOUT_CAPABILITIES, sys.executable, "-c", PROBE, *targets], capture_output=True, text=True, timeout=60
        )
        assert probe.returncode == 0, probe.stderr
        results = json.loads(probe.stdout)
        control = next(iter(results))
        assert results.pop(control) == "opened", "the probe cannot even open its own child's memfd"
        assert results == {target: errno.EACCES for target in targets}

        # kill -9 of the memory manager: the daemon fails, and no process is left holding a segment.
        inodes = memfd_inodes(memory) | memfd_inodes(executor)
        assert inodes
        os.kill(memory, signal.SIGKILL)
        assert server.process.wait(60) != 0
        assert wait_gone(list(pids.values()), 30) == []
        assert holders_of(inodes) == []
    finally:
        for pid in pids.values():
            if not is_gone(pid):
                os.kill(pid, signal.SIGKILL)
        server.stop(signal.SIGKILL)


@pytest.mark.parametrize("victim", ["executor", "scheduler"])
async def test_kill_9_of_a_worker_leaves_no_segment(tiny_model_dir, victim: str) -> None:
    from engine_driver import engine_config

    from pied.engine import Engine

    config = engine_config(tiny_model_dir("llama"), device_kv_blocks=24, kv_policy="pie", expansion="fixed:64")
    engine = Engine(config, workers="processes")
    await engine.start()
    pids = dict(engine.worker_pids)
    try:
        inodes = memfd_inodes(pids["memory"]) | memfd_inodes(pids["executor"])
        # Mapped by the executor before any plan: poll, the SegmentUpdate may still be on its way.
        deadline = time.monotonic() + 60
        while not memfd_inodes(pids["executor"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        inodes |= memfd_inodes(pids["executor"])
        assert inodes and memfd_inodes(pids["executor"]) == memfd_inodes(pids["memory"])
        os.kill(pids[victim], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not engine.dead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert engine.dead
    finally:
        await engine.shutdown()
    assert wait_gone(list(pids.values()), 30) == []
    assert holders_of(inodes) == []
