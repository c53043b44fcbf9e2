"""The memory-manager actor: owns host memory and steers the lease (DESIGN.md "Adaptive expansion").

Mailbox: DemandReport (from the scheduler, after each step and on going idle and busy), SpanBatch
(the executor's step spans, shipped over ZeroMQ), Shutdown. It creates the host segments (sealed
memfds, so nothing ever lands in /dev/shm), hands their descriptors to the executor over the fd
channel (:mod:`workers.fd_channel`, SCM_RIGHTS) when it asks, grants the scheduler a lease with
``HostLease`` (the scheduler forwards new segments to the executor before any plan can use them),
commands the staging ring's shape with ``PrefetchCommand`` (adaptive pie:
:mod:`workers.memory.prefetch`, forwarded the same way), feeds the expansion controller from the
step spans' timings and the scheduler's demand, and
releases segments once the scheduler holds nothing above a smaller lease. With an OTLP endpoint, the controller's decisions are events
on its ``lease`` spans (:mod:`workers.memory.lease_spans`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import zmq.asyncio

import proto
from proto import spans as span_names
from proto.config import EngineConfig
from proto.spans import SpanBatch, SpanRecord
from workers.actor import SUPERVISOR, Actor, Addresses, PeerGoneError, WorkerArgs
from workers.fd_channel import FdServer
from workers.memory.controller import StepSample
from workers.memory.lease_spans import LeaseSpans
from workers.memory.manager import HostMemory, LeaseChange, kv_layout_for
from workers.memory.rank_steps import SlowestRank
from workers.tracing import MEMORY_SERVICE, setup_tracing, shutdown_tracing, tracing_enabled

IDLE_TICK_SECONDS = 0.1  # an idle engine still reports, so an unused lease is returned


def step_sample_from_span(span: SpanRecord, num_layers: int) -> StepSample:
    """The timings the controller reads, from an executor ``step`` span's attributes (the step
    time is the span's own duration: the executor's whole handling of the plan)."""
    attributes = span.attributes
    return StepSample(
        step_time=(span.end_time_ns - span.start_time_ns) / 1e9,
        forward_time=float(attributes.get(span_names.STEP_FORWARD_TIME, 0.0)),
        stall_time=float(attributes.get(span_names.STEP_STALL_TIME, 0.0)),
        num_host_blocks=int(attributes.get(span_names.STEP_NUM_HOST_BLOCKS, 0)),
        bytes_to_device=int(attributes.get(span_names.STEP_BYTES_TO_DEVICE, 0)),
        num_layers=num_layers,
        layer_compute_time=float(attributes.get(span_names.STEP_LAYER_COMPUTE_TIME, 0.0)),
        copy_time=float(attributes.get(span_names.STEP_COPY_TIME, 0.0)),
        bytes_to_host=int(attributes.get(span_names.STEP_BYTES_TO_HOST, 0)),
        link_bandwidth=float(attributes.get(span_names.STEP_LINK_BANDWIDTH, 0.0)),
    )


class MemoryActor(Actor):
    def __init__(
        self,
        config: EngineConfig,
        addresses: Addresses,
        *,
        context: zmq.asyncio.Context | None = None,
        heartbeat_interval: float = 0.5,
    ) -> None:
        super().__init__(
            "memory",
            addresses.memory,
            context=context,
            supervisor=addresses.frontend,
            heartbeat_interval=heartbeat_interval,
        )
        self.config = config
        self.host: HostMemory | None = None
        self.demand = proto.DemandReport(0, 0, 0, False, 0)
        self._saw_step = False
        self._ranks = SlowestRank(config.tensor_parallel_size)  # one sample per step from N ranks
        self.tracer = setup_tracing(MEMORY_SERVICE, config)
        self.lease_spans: LeaseSpans | None = None
        self.fd_server: FdServer | None = None
        self._scheduler_gone = False
        self.connect("scheduler", addresses.scheduler)
        self.on(proto.DemandReport, self.handle_demand)
        self.on(SpanBatch, self.handle_spans)

    @classmethod
    def from_args(cls, args: WorkerArgs, context: zmq.asyncio.Context | None = None) -> MemoryActor:
        """As a worker starts it; ``context``: the engine's shared one when actors run as threads."""
        return cls(args.config, args.addresses, context=context, heartbeat_interval=args.heartbeat_interval)

    async def on_start(self) -> None:
        # The host plan comes checked in the config (pied.preflight); only the layout is built here.
        layout = await self.run_blocking(kv_layout_for, self.config)
        self.host = HostMemory(self.config, layout)
        # NOTE: listening before the first lease leaves: the executor asks for a segment's
        # descriptor only once a SegmentUpdate names it, which follows that lease.
        self.fd_server = FdServer(self.address, self._segment_fd)
        self.fd_server.start(asyncio.get_running_loop())
        self._grant(self.host.start())
        if tracing_enabled(self.tracer) and self.host.controller is not None:
            self.lease_spans = LeaseSpans(self.tracer, self.host.lease)
        self.send(
            SUPERVISOR,
            proto.Ready(worker=self.name, pid=os.getpid(), max_host_blocks=self.host.max_host_blocks),
        )
        if self.host.controller is not None:
            self.spawn(self._idle_ticks(), "idle-ticks")

    async def on_stop(self) -> None:
        if self.fd_server is not None:
            self.fd_server.close()
        if self.host is not None:
            self.host.close()
        if self.lease_spans is not None:
            self.lease_spans.close()
        # Off the loop: the exporter may take a while to give up on an unreachable collector.
        await asyncio.get_running_loop().run_in_executor(None, shutdown_tracing, self.tracer)

    def _segment_fd(self, segment_id: int, fd: int) -> tuple[int, int] | None:
        """(descriptor, bytes) of live segment ``segment_id`` created as ``fd``; None once released."""
        segment = self.host.manager.segments.get(segment_id) if self.host is not None else None
        if segment is None or segment.info.fd != fd:
            return None
        return segment.fd, segment.num_bytes

    # ---------------------------------------------------------------- handlers

    def handle_demand(self, report: proto.DemandReport) -> None:
        self.demand = report
        host = self.host
        if host is None:
            return
        # Demand against an empty lease is answered now, not when the step's span arrives.
        self._decided(lambda: host.on_demand(report))
        if not report.release_safe:
            return
        released = host.release_ready(report.host_lease, report.lease_id)
        if released:
            self._send_lease(report.host_lease, detach=released)

    def handle_spans(self, batch: SpanBatch) -> None:
        host = self.host
        if host is None:
            return
        for span in batch.spans:
            if span.name == span_names.STEP_SPAN:
                step_id = int(span.attributes.get(span_names.STEP_ID, -1))
                sample = self._ranks.add(step_id, step_sample_from_span(span, host.layout.num_layers))
                if sample is not None:
                    self._saw_step = True
                    self._observe(sample)

    # ---------------------------------------------------------------- the controller

    def _observe(self, step: StepSample | None) -> None:
        host = self.host
        if host is not None:
            self._decided(lambda: host.on_step(step, self.demand))

    def _decided(self, feed: Callable[[], LeaseChange | None]) -> None:
        """Run one input of the controller; record its decision, if it took one, on the lease
        spans, and grant the lease it moved to."""
        host = self.host
        assert host is not None
        controller = host.controller
        last = controller.decision if controller is not None else None
        change = feed()
        if self.lease_spans is not None and controller is not None and controller.decision is not last:
            self.lease_spans.decided(controller.decision, controller.stall_fraction, controller.bandwidth)
        if change is not None:
            self._grant(change)

    def _grant(self, change: LeaseChange) -> None:
        # NOTE: the scheduler applies both in arrival order and caps the lease at the ring it
        # knows: a wider ring goes first, a narrower one after the lease that fits it.
        if change.prefetch is not None and change.ring_first:
            self._to_scheduler(change.prefetch)
        self._send_lease(change.lease, attach=change.attach)
        if change.prefetch is not None and not change.ring_first:
            self._to_scheduler(change.prefetch)

    def _send_lease(
        self, lease: int, attach: list[proto.HostSegmentInfo] | None = None, detach: list[int] | None = None
    ) -> None:
        """The lease and its segment changes, with the controller's view for /metrics."""
        host = self.host
        assert host is not None
        self._to_scheduler(
            proto.HostLease(
                lease,
                attach or [],
                detach or [],
                target=host.target,
                reason=host.decision_reason,
                link_bandwidth=host.link_bandwidth,
                lease_id=host.next_lease_id(),
            ),
        )

    def _to_scheduler(self, message: proto.HostLease | proto.PrefetchCommand) -> None:
        # NOTE: the memory manager stops last (it owns the segments the executor maps); with actors
        # as threads the scheduler's mailbox is gone by then, and a lease an idle tick decides in
        # between has no one to go to. That is the engine stopping, not this actor failing (a
        # scheduler that died is reported to the supervisor by its own thread).
        if self._scheduler_gone:
            return
        try:
            self.send("scheduler", message)
        except PeerGoneError:
            self._scheduler_gone = True

    async def _idle_ticks(self) -> None:
        """Without steps there are no spans: tick the controller so it can return an unused lease
        (and see demand the scheduler cannot serve with the lease it has). Only while the scheduler
        says it is idle: a long step (a big prefill) sends no span either, and its silence is not
        an idle engine's (ticks then would read as windows without demand, and release)."""
        while True:
            await asyncio.sleep(IDLE_TICK_SECONDS)
            if not self._saw_step and self.demand.idle:
                self._observe(None)
            self._saw_step = False
