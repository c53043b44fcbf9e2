"""The actor runtime: dispatch, inproc and ipc wiring, heartbeats, and blocking work off the loop."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

import proto
from pied.runtime_dir import RuntimeDir
from proto.config import EngineConfig
from proto.plan import EnginePlan, HostPlan
from workers.actor import (
    EXIT_BAD_START,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARENT_DIED,
    Actor,
    ActorThread,
    Addresses,
    WorkerArgs,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# The test actor, as a module source: imported here for inproc tests and run as a script for the
# process tests, so both sides share one definition of the test messages.
ECHO_ACTOR_SOURCE = '''
import sys
import time

import msgspec

from workers.actor import Actor, WorkerArgs, worker_main

TEST = dict(tag=True, array_like=True, omit_defaults=True, gc=False)


class Ping(msgspec.Struct, **TEST):
    seq: int


class Pong(msgspec.Struct, **TEST):
    seq: int
    worker: str = ""


class Work(msgspec.Struct, **TEST):
    seconds: float


class WorkDone(msgspec.Struct, **TEST):
    seconds: float


class Crash(msgspec.Struct, **TEST):
    message: str


class EchoActor(Actor):
    """Answers Ping at once, Work after sleeping on its compute thread, and dies on Crash."""

    def __init__(self, name, address, reply_to, **kwargs):
        super().__init__(name, address, **kwargs)
        self.connect("reply", reply_to)
        self.on(Ping, self.handle_ping)
        self.on(Work, self.handle_work)
        self.on(Crash, self.handle_crash)

    def handle_ping(self, ping):
        self.send("reply", Pong(ping.seq, self.name))

    def handle_work(self, work):
        self.spawn(self.work(work))

    async def work(self, work):
        await self.run_blocking(time.sleep, work.seconds)
        self.send("reply", WorkDone(work.seconds))

    def handle_crash(self, crash):
        raise RuntimeError(crash.message)


def build(args: WorkerArgs) -> EchoActor:
    addresses = args.addresses
    return EchoActor(
        "executor",
        addresses.executor,
        reply_to=addresses.frontend,
        supervisor=addresses.frontend,
        heartbeat_interval=args.heartbeat_interval,
    )


if __name__ == "__main__":
    sys.exit(worker_main("executor", build))
'''


@pytest.fixture(scope="module")
def echo_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("echo") / "echo_actor.py"
    path.write_text(ECHO_ACTOR_SOURCE)
    return path


@pytest.fixture(scope="module")
def echo(echo_script) -> Any:
    spec = importlib.util.spec_from_file_location("echo_actor", echo_script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Collector:
    """A mailbox on the test's loop that queues everything it receives."""

    def __init__(self, address: str, context: zmq.asyncio.Context, echo: Any, peer: str) -> None:
        self.queue: asyncio.Queue[msgspec.Struct] = asyncio.Queue()
        self.actor = Actor("frontend", address, context=context)
        for message_type in (echo.Pong, echo.WorkDone, proto.Heartbeat, proto.Dead):
            self.actor.on(message_type, self.queue.put_nowait)
        self.actor.connect("peer", peer)
        self.actor.bind()
        self.task = asyncio.ensure_future(self.actor.run())

    def send(self, message: msgspec.Struct) -> None:
        self.actor.send("peer", message)

    async def next(self, *types: type, timeout: float = 10.0) -> Any:
        """The next message of one of ``types`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await asyncio.wait_for(self.queue.get(), max(0.01, deadline - time.monotonic()))
            if isinstance(message, types):
                return message

    async def close(self) -> None:
        self.actor.stop()
        await self.task


async def roundtrip_latency(collector: Collector, echo: Any, seq: int) -> float:
    started = time.monotonic()
    collector.send(echo.Ping(seq))
    pong = await collector.next(echo.Pong)
    assert pong.seq == seq
    return time.monotonic() - started


# -------------------------------------------------------------------- one process, actor threads


@pytest.fixture(params=["inproc", "ipc"])
def addresses(request) -> Any:
    if request.param == "inproc":
        yield Addresses.inproc()
    else:
        with RuntimeDir() as runtime_dir:
            yield Addresses.ipc(runtime_dir.socket)


async def test_dispatch_heartbeat_and_shutdown_in_a_thread(echo, addresses):
    context = zmq.asyncio.Context()  # shared by every actor: inproc endpoints are per context
    collector = Collector(addresses.frontend, context, echo, peer=addresses.executor)
    actor = echo.EchoActor(
        "executor", addresses.executor, reply_to=addresses.frontend, context=context,
        supervisor=addresses.frontend, heartbeat_interval=0.05,
    )
    thread = ActorThread(actor).start()
    try:
        first = await collector.next(proto.Heartbeat)
        second = await collector.next(proto.Heartbeat)
        assert first.worker == "executor" and second.seq > first.seq
        for seq in range(5):
            await roundtrip_latency(collector, echo, seq)
        collector.send(proto.Shutdown(reason="test"))
        assert await asyncio.to_thread(thread.join, 10)
        assert thread.exit_code == EXIT_OK
    finally:
        thread.stop()
        await collector.close()
        context.term()


async def test_blocking_work_does_not_block_the_loop(echo, addresses):
    context = zmq.asyncio.Context()
    collector = Collector(addresses.frontend, context, echo, peer=addresses.executor)
    actor = echo.EchoActor(
        "executor", addresses.executor, reply_to=addresses.frontend, context=context,
        supervisor=addresses.frontend, heartbeat_interval=0.05,
    )
    thread = ActorThread(actor).start()
    try:
        await roundtrip_latency(collector, echo, 0)
        collector.send(echo.Work(1.5))
        await asyncio.sleep(0.1)
        # While the compute thread sleeps: pings are answered at once and heartbeats keep coming.
        latencies = [await roundtrip_latency(collector, echo, seq) for seq in range(1, 6)]
        assert max(latencies) < 0.5, latencies
        beat = await collector.next(proto.Heartbeat, timeout=1.0)
        assert beat.worker == "executor"
        done = await collector.next(echo.WorkDone, timeout=10)
        assert done.seconds == 1.5
    finally:
        thread.stop()
        await collector.close()
        context.term()


async def test_handler_error_sends_dead_and_fails(echo):
    addresses = Addresses.inproc()
    context = zmq.asyncio.Context()
    collector = Collector(addresses.frontend, context, echo, peer=addresses.executor)
    actor = echo.EchoActor(
        "executor", addresses.executor, reply_to=addresses.frontend, context=context,
        supervisor=addresses.frontend, heartbeat_interval=0.05,
    )
    thread = ActorThread(actor).start()
    try:
        # A message nobody can decode is dropped; the actor stays up.
        raw = context.socket(zmq.PUSH)
        raw.connect(addresses.executor)
        await raw.send(b"\xc1not msgpack")
        await raw.send(msgspec.msgpack.encode(proto.StepPlan(0, [], b"", b"", b"", b"", b"", b"")))
        raw.close(linger=0)
        await roundtrip_latency(collector, echo, 1)
        collector.send(echo.Crash("boom"))
        dead = await collector.next(proto.Dead)
        assert dead.worker == "executor" and "boom" in dead.reason
        assert await asyncio.to_thread(thread.join, 10)
        assert thread.exit_code == EXIT_FAILED
    finally:
        thread.stop()
        await collector.close()
        context.term()


def test_stop_before_the_loop_runs_is_not_lost(echo):
    addresses = Addresses.inproc()
    context = zmq.asyncio.Context()
    actor = echo.EchoActor("executor", addresses.executor, reply_to=addresses.frontend, context=context)
    actor.stop_threadsafe()
    thread = ActorThread(actor)
    thread._thread.start()
    assert thread.join(10) and thread.exit_code == EXIT_OK
    context.term()


# -------------------------------------------------------------------- actor processes over ipc


# A worker process is started with the plan the daemon's preflight derived; the echo actor reads
# nothing of it, so any well-formed plan does.
PLAN = EnginePlan(
    model_path="/nonexistent", device="cpu", dtype="float32", max_model_len=64, num_device_blocks=16,
    host=HostPlan(), num_layers=1, num_kv_heads=1, head_dim=8,
)  # fmt: skip
PLANNED = EngineConfig(plan=PLAN)
WORKER_ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
)


def start_echo_process(echo_script: Path, addresses: Addresses) -> tuple[subprocess.Popen[bytes], int]:
    read_fd, write_fd = os.pipe()
    args = WorkerArgs(config=PLANNED, addresses=addresses, parent_fd=read_fd, heartbeat_interval=0.05)
    env = WORKER_ENV
    process = subprocess.Popen(
        [sys.executable, str(echo_script), msgspec.json.encode(args).decode()],
        pass_fds=(read_fd,),
        stdin=subprocess.DEVNULL,
        env=env,
    )
    os.close(read_fd)
    return process, write_fd


async def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return process.poll()


async def test_actor_process_over_ipc(echo, echo_script):
    with RuntimeDir() as runtime_dir:
        addresses = Addresses.ipc(runtime_dir.socket)
        context = zmq.asyncio.Context()
        collector = Collector(addresses.frontend, context, echo, peer=addresses.executor)
        process, write_fd = start_echo_process(echo_script, addresses)
        try:
            await collector.next(proto.Heartbeat, timeout=30)
            await roundtrip_latency(collector, echo, 1)
            collector.send(echo.Work(1.0))
            await asyncio.sleep(0.1)
            assert await roundtrip_latency(collector, echo, 2) < 0.5  # answered while the work runs
            await collector.next(echo.WorkDone)
            collector.send(proto.Shutdown())
            assert await wait_exit(process, 10) == EXIT_OK
        finally:
            process.kill()
            process.wait()
            os.close(write_fd)
            await collector.close()
            context.destroy(linger=0)


async def test_actor_process_exits_when_its_parent_dies(echo, echo_script):
    with RuntimeDir() as runtime_dir:
        addresses = Addresses.ipc(runtime_dir.socket)
        context = zmq.asyncio.Context()
        collector = Collector(addresses.frontend, context, echo, peer=addresses.executor)
        process, write_fd = start_echo_process(echo_script, addresses)
        try:
            await collector.next(proto.Heartbeat, timeout=30)
            collector.send(echo.Work(30.0))  # busy in its compute thread: must still exit
            await asyncio.sleep(0.1)
            os.close(write_fd)  # what the kernel does when the parent dies
            write_fd = -1
            assert await wait_exit(process, 5) == EXIT_PARENT_DIED
        finally:
            process.kill()
            process.wait()
            if write_fd >= 0:
                os.close(write_fd)
            await collector.close()
            context.destroy(linger=0)


def start_message(**changes: Any) -> dict[str, Any]:
    """A well-formed start message as JSON-ready data, with top-level ``changes``."""
    args = WorkerArgs(config=PLANNED, addresses=Addresses.inproc(), heartbeat_interval=0.05)
    return msgspec.to_builtins(args) | changes


def bad_config(**changes: Any) -> dict[str, Any]:
    return msgspec.to_builtins(PLANNED) | changes


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "usage: python -m workers.executor"),
        (["{}", "{}"], "usage: python -m workers.executor"),
        (["{not json"], "bad start message: it is not valid JSON"),
        (["[]"], "bad start message: it does not match WorkerArgs: Expected `object`, got `array`"),
        ([start_message(config=None)], "it does not match WorkerArgs: Expected `object`, got `null` - at `$.config`"),
        ([{"config": msgspec.to_builtins(PLANNED)}], "missing required field `addresses`"),
        ([start_message(heartbeat_interval="fast")], "Expected `float`, got `str` - at `$.heartbeat_interval`"),
        ([start_message(config=bad_config(plan=None))], "its config carries no plan"),
        ([start_message(config=bad_config(plan={"device": "cpu"}))], "missing required field `model_path`"),
        ([start_message(config=bad_config(block_size=0))], "its config is invalid: --block-size"),
        ([start_message(rank=1)], "rank 1 is not in [0, 1)"),
        ([start_message(heartbeat_interval=0)], "heartbeat_interval must be a positive number of seconds"),
        ([start_message(log_level="LOUD")], "log_level 'LOUD' is not a logging level"),
        ([start_message(addresses={"frontend": "", "scheduler": "a", "executor": "b"})], "addresses.frontend is empty"),
    ],
)  # fmt: skip
def test_a_malformed_or_incomplete_start_message_exits_2_saying_what_is_wrong(echo_script, argv, message):
    """Before anything starts (no actor, no socket): one line on stderr, exit status 2."""
    argv = [arg if isinstance(arg, str) else msgspec.json.encode(arg).decode() for arg in argv]
    done = subprocess.run(
        [sys.executable, str(echo_script), *argv], env=WORKER_ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EXIT_BAD_START, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_real_workers_refuse_a_config_without_a_plan():
    """``python -m workers.scheduler``: the entry points the daemon starts check it too."""
    args = msgspec.json.encode(start_message(config=bad_config(plan=None))).decode()
    done = subprocess.run(
        [sys.executable, "-m", "workers.scheduler", args],
        cwd=REPO_ROOT, env=WORKER_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == EXIT_BAD_START, done.stderr
    assert "pied scheduler worker" in done.stderr and "its config carries no plan" in done.stderr


def test_runtime_dir_is_private_and_removed():
    with RuntimeDir() as runtime_dir:
        path = runtime_dir.path
        assert path.is_dir() and (path.stat().st_mode & 0o777) == 0o700
        assert runtime_dir.socket("scheduler") == f"ipc://{path}/scheduler.sock"
        (path / "leftover").write_text("x")
    assert not path.exists() and runtime_dir.removed


def test_runtime_dir_prefers_systemd_then_xdg(tmp_path, monkeypatch):
    systemd, xdg = tmp_path / "systemd", tmp_path / "xdg"
    systemd.mkdir()
    xdg.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(systemd))
    with RuntimeDir() as runtime_dir:
        assert runtime_dir.path.parent == systemd
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    with RuntimeDir() as runtime_dir:
        assert runtime_dir.path.parent == xdg
    with pytest.raises(OSError, match="longer than"):
        RuntimeDir(tmp_path).socket("x" * 120)


# -------------------------------------------------------------------- the engine's actors, inproc


class FakeRunner:
    """A model runner without a model: every sampled token is 7, after a short 'forward'."""

    num_device_blocks = 64
    model_config = SimpleNamespace(eos_token_ids=frozenset({2}), max_position_embeddings=512, vocab_size=512)

    def __init__(self, config: EngineConfig) -> None:
        self.block_size = config.block_size
        self.fail_at_step = config.extra.get("fail_at_step", -1)

    def execute(self, plan: proto.StepPlan) -> proto.StepResult:
        if plan.step_id == self.fail_at_step:
            raise RuntimeError("forward failed on purpose")
        time.sleep(0.005)  # blocking, like a forward pass
        num_samples = sum(plan.sample)
        return proto.StepResult(plan.step_id, proto.pack_i32([7] * num_samples), forward_time=0.005, step_time=0.006)

    def close(self) -> None:
        pass


class Frontend:
    """The frontend's mailbox on the test loop, queueing what the scheduler and executor send."""

    def __init__(self, address: str, context: zmq.asyncio.Context, scheduler: str) -> None:
        self.queue: asyncio.Queue[msgspec.Struct] = asyncio.Queue()
        self.stats = proto.Stats()
        self.actor = Actor("frontend", address, context=context)
        for message_type in (proto.Ready, proto.Heartbeat, proto.TokenDeltas, proto.Dead):
            self.actor.on(message_type, self.queue.put_nowait)
        self.actor.on(proto.Stats, self._stats)
        self.actor.connect("scheduler", scheduler)
        self.actor.bind()
        self.task = asyncio.ensure_future(self.actor.run())

    def _stats(self, stats: proto.Stats) -> None:
        self.stats = stats

    async def next(self, message_type: type, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            message = await asyncio.wait_for(self.queue.get(), max(0.01, deadline - time.monotonic()))
            if isinstance(message, message_type):
                return message

    async def deltas(self, request_id: str) -> list[proto.TokenDelta]:
        """Every delta of one request, up to its final one (other requests' deltas are dropped)."""
        found = []
        while not found or found[-1].finish_reason is None:
            batch = await self.next(proto.TokenDeltas)
            found += [delta for delta in batch.deltas if delta.request_id == request_id]
        return found


def engine_actors(config: EngineConfig, addresses: Addresses, context: zmq.asyncio.Context):
    from workers.executor.actor import ExecutorActor
    from workers.scheduler.actor import SchedulerActor

    executor = ExecutorActor(config, addresses, context=context, heartbeat_interval=0.05, runner_factory=FakeRunner)
    scheduler = SchedulerActor(config, addresses, context=context, heartbeat_interval=0.05)
    return ActorThread(executor).start(), ActorThread(scheduler).start()


def add_request(request_id: str, max_tokens: int) -> proto.AddRequest:
    params = proto.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return proto.AddRequest(request_id, proto.pack_i32([1, 2, 3, 4, 5]), params)


async def test_scheduler_and_executor_actors_over_inproc():
    addresses = Addresses.inproc()
    context = zmq.asyncio.Context()
    frontend = Frontend(addresses.frontend, context, addresses.scheduler)
    threads = engine_actors(EngineConfig(block_size=4), addresses, context)
    try:
        readies = {(await frontend.next(proto.Ready)).worker for _ in range(2)}
        assert readies == {"scheduler", "executor"}

        frontend.actor.send("scheduler", add_request("short", 5))
        deltas = await frontend.deltas("short")
        tokens = [t for d in deltas for t in proto.unpack_i32(d.token_ids).tolist()]
        assert tokens == [7] * 5 and deltas[-1].finish_reason == proto.FinishReason.LENGTH

        # Abort while generating: gone within a step, with its blocks.
        frontend.actor.send("scheduler", add_request("long", 400))
        await frontend.next(proto.TokenDeltas)
        frontend.actor.send("scheduler", proto.AbortRequests(["long"]))
        deltas = await frontend.deltas("long")
        assert deltas[-1].finish_reason == proto.FinishReason.ABORT
        # NOTE: the snapshot from before "long" also shows nothing running: wait for one that
        # counts its steps (snapshots are rate-limited while busy; the idle one is forced).
        deadline = time.monotonic() + 5

        def settled() -> bool:
            stats = frontend.stats
            return not stats.device_usage and not stats.num_running and stats.num_steps >= 6

        while not settled() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert frontend.stats.device_usage == 0.0 and frontend.stats.num_running == 0
        assert frontend.stats.num_steps >= 6 and frontend.stats.forward_seconds_total > 0

        frontend.actor.connect("executor", addresses.executor)  # a peer named while running
        for name in ("scheduler", "executor"):
            frontend.actor.send(name, proto.Shutdown())
        for thread in threads:
            assert await asyncio.to_thread(thread.join, 10) and thread.exit_code == EXIT_OK
    finally:
        for thread in threads:
            thread.stop()
        frontend.actor.stop()
        await frontend.task
        context.term()


async def test_failed_forward_kills_the_executor_with_a_reason():
    addresses = Addresses.inproc()
    context = zmq.asyncio.Context()
    frontend = Frontend(addresses.frontend, context, addresses.scheduler)
    threads = engine_actors(EngineConfig(block_size=4, extra={"fail_at_step": 2}), addresses, context)
    executor, scheduler = threads
    try:
        frontend.actor.send("scheduler", add_request("doomed", 50))
        dead = await frontend.next(proto.Dead)
        assert dead.worker == "executor" and "forward failed on purpose" in dead.reason
        assert await asyncio.to_thread(executor.join, 10) and executor.exit_code == EXIT_FAILED
        assert scheduler.is_alive()  # stopping it is the supervisor's call
    finally:
        for thread in threads:
            thread.stop()
        frontend.actor.stop()
        await frontend.task
        context.term()
