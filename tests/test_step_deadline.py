"""The step deadline: a forward pass that never returns kills the engine (issue 17, "Hardening").

Heartbeats come from the actors' loops, so they go on while the executor's compute thread is stuck.
The test-only fault hook ``PIED_TEST_HANG_STEP=N`` (``workers.executor.step_hang``) blocks step N on
the compute thread; with ``--step-timeout`` the executor's loop notices, and every request in flight
fails with a clear error: through ``pied.LLM`` (threads), ``Engine(workers="processes")`` and a real
``pied serve``, which exits non-zero leaving no worker and no host memory segment behind.
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
import zmq.asyncio
from daemon import NotifySocket, is_gone, processes_mentioning, wait_gone, worker_pids
from engine_driver import collect, greedy, running_engine
from server import EventStream, start_server

import proto
from pied import LLM, SamplingParams
from pied.engine_client import EngineDeadError
from proto.config import ConfigError, EngineConfig
from workers.actor import EXIT_FAILED, Actor, ActorThread, Addresses
from workers.executor.step_deadline import StepDeadline
from workers.executor.step_hang import ENVIRONMENT_VARIABLE, StepHang

# A tiny model's step takes milliseconds (seconds would be an extreme stall); the hung one never returns.
STEP_TIMEOUT = 5.0
HANG_STEP = 3  # a few steps run (and are measured) before the stuck one
WAIT = 120.0  # how long any poll below may take before the test fails (a loaded machine)
PROMPTS = [[1, 17, 99, 3, 250], [1, *range(40, 77)], [1, 300, 301, 302]]

# ---------------------------------------------------------------- the deadline itself (unit)


def test_a_fixed_step_timeout_is_the_deadline_of_every_step() -> None:
    deadline = StepDeadline(2.5)
    assert deadline.seconds() == 2.5  # the first step too: the operator said so
    for elapsed in (0.1, 40.0, 0.2):
        deadline.record(elapsed)
        assert deadline.seconds() == 2.5


def test_the_derived_deadline_is_generous_first_then_follows_the_slowest_recent_step() -> None:
    deadline = StepDeadline(floor=10.0, factor=4.0, window=3, num_warmup_steps=2, warmup_seconds=100.0)
    assert deadline.seconds() == 100.0  # kernels compile on their first use
    deadline.record(30.0)
    assert deadline.seconds() == 100.0
    deadline.record(0.5)
    assert deadline.seconds() == 4.0 * 30.0  # the slowest recent step, times the factor
    deadline.record(1.0)
    deadline.record(2.0)  # the 30 s step leaves the window of 3
    assert deadline.seconds() == 10.0  # the floor: 4 x 2 s is less
    deadline.record(5.0)
    assert deadline.seconds() == 20.0
    for _ in range(3):
        deadline.record(0.01)
    assert deadline.seconds() == 10.0


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan])
def test_a_step_timeout_must_be_a_positive_number_of_seconds(value: float) -> None:
    with pytest.raises(ConfigError, match="--step-timeout"):
        EngineConfig(step_timeout=value).validate()
    with pytest.raises(ValueError):
        StepDeadline(value)


def test_the_fault_hook_is_off_unless_a_test_sets_it() -> None:
    assert StepHang.from_environment({}) is None
    assert StepHang.from_environment({ENVIRONMENT_VARIABLE: "4"}).step_id == 4
    with pytest.raises(ValueError, match=ENVIRONMENT_VARIABLE):
        StepHang.from_environment({ENVIRONMENT_VARIABLE: "soon"})


# ---------------------------------------------------------------- the executor's watch (unit)


class SlowRunner:
    """No model: a step takes 10 ms, except ``block_step``, which waits for ``release``; unmapping a
    host segment takes ``detach_seconds``."""

    num_device_blocks = 16
    block_size = 4
    model_config = SimpleNamespace(eos_token_ids=frozenset({2}), max_position_embeddings=64, vocab_size=32)

    def __init__(self, block_step: int, detach_seconds: float) -> None:
        self.block_step = block_step
        self.detach_seconds = detach_seconds
        self.release = threading.Event()

    def execute(self, plan: proto.StepPlan) -> proto.StepResult:
        if plan.step_id == self.block_step:
            self.release.wait(WAIT)
        time.sleep(0.01)
        return proto.StepResult(plan.step_id, b"")

    def detach_host_segments(self, segment_ids: list[int]) -> None:
        time.sleep(self.detach_seconds)

    def close(self) -> None:
        pass


def empty_plan(step_id: int) -> proto.StepPlan:
    return proto.StepPlan(step_id, [], b"", b"", b"", b"", b"", b"")


async def test_the_executor_times_a_step_from_its_own_start_and_fails_on_a_stuck_one() -> None:
    from workers.executor.actor import ExecutorActor

    step_timeout = 1.0  # a 10 ms step is far inside it, the 2.5 s segment update not
    runner = SlowRunner(block_step=1, detach_seconds=2.5 * step_timeout)
    addresses = Addresses.inproc()
    context = zmq.asyncio.Context()
    received: asyncio.Queue[msgspec.Struct] = asyncio.Queue()
    peers = []
    for name, address in (("scheduler", addresses.scheduler), ("supervisor", addresses.frontend)):
        peer = Actor(name, address, context=context)
        for message_type in (proto.Ready, proto.StepResult, proto.Heartbeat, proto.Dead):
            peer.on(message_type, received.put_nowait)
        peer.connect("executor", addresses.executor)
        peer.bind()
        peers.append((peer, asyncio.ensure_future(peer.run())))
    config = EngineConfig(block_size=4, step_timeout=step_timeout)
    executor = ActorThread(
        ExecutorActor(
            config, addresses, context=context, heartbeat_interval=0.05, runner_factory=lambda _: runner
        )
    ).start()

    async def next_message(*types: type) -> msgspec.Struct:
        while True:
            message = await asyncio.wait_for(received.get(), WAIT)
            if isinstance(message, types):
                return message

    try:
        await next_message(proto.Ready)
        scheduler = peers[0][0]
        # A step queued behind a segment update longer than the step deadline is not blamed for it.
        scheduler.send("executor", proto.SegmentUpdate(detach=[1]))
        scheduler.send("executor", empty_plan(0))
        assert (await next_message(proto.StepResult, proto.Dead)) == proto.StepResult(0, b"")
        # A step that never returns: Dead, and the executor stops without waiting for it.
        scheduler.send("executor", empty_plan(1))
        dead = await next_message(proto.StepResult, proto.Dead)
        assert isinstance(dead, proto.Dead) and dead.worker == "executor", dead
        assert dead.reason == (
            f"step 1 did not return within its deadline of {step_timeout:g} s (--step-timeout): "
            "the compute thread is stuck"
        )
        assert await asyncio.to_thread(executor.join, WAIT) and executor.exit_code == EXIT_FAILED
        assert not runner.release.is_set()  # still stuck: nobody waited for it
    finally:
        runner.release.set()
        executor.stop()
        for peer, task in peers:
            peer.stop()
            await task
        context.term()


# ---------------------------------------------------------------- the engine, threads and processes


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama", max_position_embeddings=1024)


def compute_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("executor-compute")]


def test_llm_with_a_stuck_step_raises_engine_dead(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(HANG_STEP))
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    llm = LLM(
        model=str(model_dir), dtype="float32", block_size=4, device_kv_blocks=256, step_timeout=STEP_TIMEOUT
    )
    try:
        with pytest.raises(EngineDeadError, match=f"step {HANG_STEP} did not return within its deadline"):
            llm.generate([{"prompt_token_ids": prompt} for prompt in PROMPTS], params)
        assert llm.engine.dead and not llm.engine.healthy
        assert "--step-timeout" in llm.engine.dead_reason
    finally:
        llm.shutdown()
    # The stuck pass was let go as the executor stopped (the hook's doing: a real one stays stuck).
    deadline = time.monotonic() + WAIT
    while compute_threads():
        assert time.monotonic() < deadline, compute_threads()
        time.sleep(0.05)


async def test_engine_processes_with_a_stuck_step_fail_every_request(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(HANG_STEP))
    async with running_engine(model_dir, workers="processes", step_timeout=STEP_TIMEOUT) as engine:
        pids = engine.worker_pids
        streams = [
            engine.add_request(proto.AddRequest(f"r{i}", proto.pack_i32(prompt), greedy(200)))
            for i, prompt in enumerate(PROMPTS)
        ]
        for stream in streams:
            with pytest.raises(EngineDeadError, match=f"step {HANG_STEP} did not return"):
                await asyncio.wait_for(collect(stream), WAIT)
        reason = await asyncio.wait_for(engine.wait_dead(), WAIT)
        assert "executor" in reason and "--step-timeout" in reason
        assert not engine.healthy
        with pytest.raises(EngineDeadError):
            engine.add_request(proto.AddRequest("late", proto.pack_i32([1]), greedy(2)))
    assert wait_gone(list(pids.values()), WAIT) == []


# ---------------------------------------------------------------- pied serve


def host_segments_of(pids: list[int]) -> int:
    """Host KV segments (memfds) any of ``pids`` holds open or mapped."""
    count = 0
    for pid in pids:
        try:
            count += Path(f"/proc/{pid}/maps").read_text().count("/memfd:pied-kv")
            fds = Path(f"/proc/{pid}/fd")
            count += sum(1 for fd in fds.iterdir() if "memfd:pied-kv" in str(fd.readlink()))
        except OSError:
            continue  # gone
    return count


def read_outcome(stream: EventStream) -> str:
    """``complete`` ([DONE] without an error) or ``error`` (a 503, an error event, or the connection
    cut)."""
    if stream.status != 200:
        assert stream.status == 503, stream.response.read()
        stream.close()
        return "error"
    try:
        for event in stream.rest():
            if isinstance(event, dict) and "error" in event:
                return "error"
        return "complete" if stream.response.isclosed() else "error"
    except OSError:
        return "error"
    finally:
        stream.close()


def test_serve_with_a_stuck_step_fails_its_requests_and_exits_non_zero(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime_parent = tmp_path / "run"
    runtime_parent.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime_parent))
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(HANG_STEP))
    notify = NotifySocket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s while healthy
    server = start_server(
        model_dir, "--step-timeout", str(STEP_TIMEOUT), "--block-size", "4", "--device-kv-blocks", "24",
        "--kv-policy", "pie", "--expansion", "fixed:96",
    )  # fmt: skip
    try:
        pids = worker_pids(server.process.pid)
        assert host_segments_of(list(pids.values())) > 0  # the host tier exists: it must go too
        notify.wait_for("WATCHDOG", "1", WAIT)
        body = {
            "prompt": "The stuck step",
            "max_tokens": 200,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        streams = [EventStream(server, "/v1/completions", body, timeout=WAIT) for _ in range(3)]
        outcomes = [read_outcome(stream) for stream in streams]
        assert outcomes == ["error"] * 3, outcomes
        # Answered after the requests failed, so after the engine died: never 200 again.
        try:
            assert server.request("GET", "/health", timeout=10).status == 503
        except OSError:
            pass  # already gone
        status = server.process.wait(WAIT)
        log = server.log()
        assert status == 1, log[-3000:]
        assert (
            f"step {HANG_STEP} did not return within its deadline of {STEP_TIMEOUT:g} s (--step-timeout)"
            in log
        ), log[-3000:]
        assert wait_gone(list(pids.values()), WAIT) == [], "a worker outlived the daemon"
        assert all(is_gone(pid) for pid in pids.values())
        assert host_segments_of(list(pids.values())) == 0
        assert processes_mentioning(str(runtime_parent)) == []
        assert list(runtime_parent.iterdir()) == []
        # The watchdog pings stopped with the engine: none after STOPPING (the engine died).
        messages = [fields for _, fields in notify.messages]
        stopping = next(i for i, fields in enumerate(messages) if "STOPPING" in fields)
        assert not any("WATCHDOG" in fields for fields in messages[stopping:]), messages
        assert "died" in notify.values("STATUS")[-1]
    finally:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)
        else:
            server.stop()
        notify.close()
