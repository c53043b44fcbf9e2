"""Host memory is released only when no plan can use it (DESIGN.md "Adaptive expansion"; issue 19).

The memory manager, the scheduler and the executor are driven here through their own message
handlers, with each message delivered by hand, so that the interleaving a loaded machine produces
now and then (CI saw it as ``host block 0 is in no mapped host segment``) happens every time:

1. the scheduler holds an empty lease and, short of blocks, says so;
2. the memory manager grows the lease (a new segment) — the grant is still on its way;
3. the scheduler, not having applied it, reports "release-safe" at lease 0;
4. the memory manager shrinks the lease back to 0, then reads that stale report.

A report told apart only by the lease's *size* looks current at step 4, so the new segment was
released before the executor mapped it; the executor then skipped it (the fd channel answered
"released") while the scheduler, having applied the grant, planned into its blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import zmq.asyncio

import proto
from pied.preflight import preflight
from proto.config import EngineConfig
from workers.actor import Addresses, PeerGoneError
from workers.executor.actor import ExecutorActor, ready_message
from workers.executor.runner import ModelRunner
from workers.memory.actor import MemoryActor
from workers.memory.controller import Decision
from workers.memory.manager import HostMemory
from workers.scheduler.actor import SchedulerActor
from workers.scheduler.scheduler import Scheduler

NUM_DEVICE_BLOCKS = 4
GROWN_LEASE = 16


class Wire:
    """Every message an actor sends, kept per receiver until the test delivers it."""

    def __init__(self) -> None:
        self.queues: dict[str, list[object]] = {}

    def tap(self, actor: object, peers: dict[str, str]) -> None:
        """Route ``actor.send(peer, message)`` into the queue of ``peers[peer]`` (others dropped)."""

        def send(peer: str, message: object) -> None:
            if peer in peers:
                self.queues.setdefault(peers[peer], []).append(message)

        actor.send = send  # type: ignore[attr-defined]

    def take(self, receiver: str, count: int | None = None) -> list[object]:
        queue = self.queues.setdefault(receiver, [])
        count = len(queue) if count is None else count
        taken, queue[:] = queue[:count], queue[count:]
        return taken


class Engine:
    """The three actors of one engine, not running: the test is their event loop."""

    def __init__(self, config: EngineConfig, context: zmq.asyncio.Context) -> None:
        addresses = Addresses.inproc()
        self.wire = Wire()
        self.memory = MemoryActor(config, addresses, context=context)
        self.scheduler_actor = SchedulerActor(config, addresses, context=context)
        self.executor = ExecutorActor(config, addresses, context=context)
        self.wire.tap(self.memory, {"scheduler": "scheduler"})
        self.wire.tap(self.scheduler_actor, {"memory": "memory", "executor": "executor"})
        self.runner = ModelRunner(config)
        self.executor.runner = self.runner
        self.memory.host = host = HostMemory(config)
        # The executor asks the memory manager for a descriptor as the fd channel does (a copy
        # of it, or None once the segment is released), at the moment it maps the segment.
        lookup = self.memory._segment_fd

        def open_fd(info: proto.HostSegmentInfo) -> int | None:
            found = lookup(info.segment_id, info.fd)
            return None if found is None else os.dup(found[0])

        self.executor.segment_fds = SimpleNamespace(open=open_fd, close=lambda: None)
        ready = ready_message("executor", config, self.runner)
        self.scheduler = Scheduler(
            config,
            ready.num_device_blocks,
            set(ready.eos_token_ids),
            ready.max_model_len,
            host.max_host_blocks,
        )
        self.scheduler_actor.scheduler = self.scheduler
        self.memory._grant(host.start())
        self.decisions: list[Decision] = []
        # The controller's decisions are scripted: this test is about the order of messages.
        assert host.controller is not None
        host.controller.observe = lambda step, demand: self.decisions.pop(0) if self.decisions else None

    # ---- the memory manager's mailbox

    def memory_decides(self, lease: int) -> None:
        """The controller moves the lease to ``lease`` on the next step span."""
        self.decisions.append(Decision(lease, lease, f"scripted {lease}"))
        self.memory._observe(None)

    def memory_reads_reports(self, count: int | None = None) -> None:
        for report in self.wire.take("memory", count):
            assert isinstance(report, proto.DemandReport)
            self.memory.handle_demand(report)

    # ---- the scheduler's step loop, one piece at a time (SchedulerActor._step_loop)

    def scheduler_applies(self, count: int | None = None) -> None:
        for message in self.wire.take("scheduler", count):
            self.scheduler_actor._enqueue(message)
        self.scheduler_actor._apply_pending(self.scheduler)

    def scheduler_steps(self) -> proto.StepPlan | None:
        """Schedule; the executor takes its segment updates and runs the plan; the scheduler
        postprocesses and reports (or reports idle)."""
        actor = self.scheduler_actor
        plan = self.scheduler.schedule()
        if plan is None:
            actor._report_demand(self.scheduler, actor._step_id, idle=True)
            return None
        actor._step_id = plan.step_id
        self.executor_handles_updates()
        result = self.runner.execute(plan)
        self.scheduler.postprocess(plan, result)
        actor._last_result = result
        actor._report_demand(self.scheduler, plan.step_id)
        return plan

    def executor_handles_updates(self) -> None:
        for update in self.wire.take("executor"):
            assert isinstance(update, proto.SegmentUpdate)
            self.executor._update_segments(update)

    def close(self) -> None:
        self.runner.close()
        self.memory.host.close()


def adaptive_pie_config(model_dir, **overrides) -> EngineConfig:
    """The tiny Llama under pie with adaptive expansion and a 2 MB host budget, through the preflight."""
    return preflight(
        EngineConfig(
            model=str(model_dir), dtype="float32", device="cpu", block_size=4, kv_policy="pie", host_kv_gib=0.002,
            **overrides,
        )
    )  # fmt: skip


@pytest.fixture
def engine(tiny_model_dir) -> Iterator[Engine]:
    config = adaptive_pie_config(tiny_model_dir("llama"), device_kv_blocks=NUM_DEVICE_BLOCKS)
    context = zmq.asyncio.Context()
    built = Engine(config, context)
    try:
        yield built
    finally:
        built.close()
        context.term()


def host_block_ids(plan: proto.StepPlan, num_device_blocks: int) -> set[int]:
    return {block for block in proto.unpack_i32(plan.block_tables).tolist() if block >= num_device_blocks}


def test_a_stale_release_safe_report_does_not_release_a_lease_that_grew_and_shrank_back(
    engine: Engine,
) -> None:
    scheduler, pool = engine.scheduler, engine.runner.host_kv.pool
    engine.scheduler_applies()  # the first lease: 0
    assert scheduler.host_lease == 0
    # A prompt longer than the device pool: it runs only once host blocks are granted.
    prompt = [1] + list(range(5, 5 + 4 * NUM_DEVICE_BLOCKS + 6))
    request = proto.AddRequest(
        "long", proto.pack_i32(prompt), proto.SamplingParams(temperature=0, max_tokens=4)
    )
    engine.scheduler_actor._enqueue(request)
    engine.scheduler_applies()
    assert engine.scheduler_steps() is None  # short of blocks at lease 0: an idle report
    engine.memory_reads_reports()

    engine.memory_decides(GROWN_LEASE)  # grant 16 blocks: segment 0 attached, still on the wire
    grant = engine.wire.queues["scheduler"][-1]
    assert isinstance(grant, proto.HostLease) and grant.lease == GROWN_LEASE and grant.attach
    # The scheduler reports again before it applies the grant (an idle report here; after a step
    # of other requests in a real run): release-safe, at lease 0.
    assert engine.scheduler_steps() is None
    stale = engine.wire.queues["memory"][-1]
    assert isinstance(stale, proto.DemandReport) and stale.release_safe and stale.host_lease == 0
    engine.memory_decides(0)  # the controller shrinks back to 0 before it reads that report
    engine.memory_reads_reports()
    assert engine.memory.host.manager.segments, "a stale report released the segment the grant attached"

    # The scheduler applies the grant alone (the shrink is still on the wire) and plans into it.
    engine.scheduler_applies(1)
    assert scheduler.host_lease == GROWN_LEASE
    plan = engine.scheduler_steps()  # raised "host block ... in no mapped host segment" before
    assert plan is not None and host_block_ids(plan, NUM_DEVICE_BLOCKS)
    assert list(pool.segments) == [0]

    # The rest arrives: the scheduler moves off the host, reports at the lease it now holds, and
    # only that report releases the segment, which the executor then unmaps.
    engine.scheduler_applies()
    assert scheduler.host_lease == 0
    for _ in range(10):
        engine.scheduler_steps()
        engine.memory_reads_reports()
        engine.scheduler_applies()
        engine.executor_handles_updates()
        if not engine.memory.host.manager.segments:
            break
    assert scheduler.num_host_blocks_used == 0
    assert not engine.memory.host.manager.segments and not pool.segments


def test_a_lease_decided_after_the_scheduler_stopped_is_not_a_failure(tiny_model_dir) -> None:
    """The memory manager stops last (it owns the segments); with actors as threads the scheduler's
    mailbox is closed by then, and an idle tick that moves the lease meanwhile must not fail the
    memory manager (an engine shut down cleanly would log it as dead)."""
    config = adaptive_pie_config(tiny_model_dir("llama"))
    context = zmq.asyncio.Context()
    memory = MemoryActor(config, Addresses.inproc(), context=context)
    memory.host = host = HostMemory(config)
    sent: list[object] = []

    def send(peer: str, message: object) -> None:
        if peer == "scheduler" and len(sent) >= 1:
            raise PeerGoneError("the scheduler takes no messages: its mailbox is closed")
        sent.append(message)

    memory.send = send  # type: ignore[method-assign]
    try:
        memory._grant(host.start())
        assert host.controller is not None
        decisions = [Decision(8, 8, "grow: scripted"), Decision(0, 0, "release: scripted")]
        host.controller.observe = lambda step, demand: decisions.pop(0) if decisions else None
        memory._observe(None)  # the scheduler has stopped: nothing to send it, nothing failed
        memory._observe(None)
        assert len(sent) == 1 and not decisions and memory.exit_code == 0
    finally:
        host.close()
        context.term()
