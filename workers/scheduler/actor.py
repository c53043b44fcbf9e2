"""The scheduler actor: the step loop between the frontend and the executor.

Mailbox: AddRequest and AbortRequests (from the frontend), Ready and StepResult (from the executor),
RankStep (from tensor-parallel ranks other than 0: their own figures, summed into Stats.ranks),
Shutdown. Once the executor is Ready (the scheduler needs the model's shape), the step loop runs::

    apply queued adds/aborts -> schedule -> StepPlan to executor -> await StepResult
    -> postprocess -> TokenDeltas (and, throttled, Stats) to the frontend

With ``--async-scheduling`` the loop plans one step ahead: it sends the plan of step t+1 before it
awaits step t's result, so the executor starts t+1 as soon as t is done and the scheduler's work
(postprocess, deltas, the next plan) runs while the executor computes::

    apply queued adds/aborts -> schedule t+1 -> StepPlan t+1 -> await StepResult t -> postprocess t

A step with tensor parallelism is planned synchronously (the other ranks would need rank 0's
sampled tokens to fill the plan's placeholders).

Handlers only queue adds and aborts; the step loop applies them between steps, so the plain
:class:`Scheduler` is only ever touched by one coroutine at a known point of the cycle, and an
aborted request is gone (its blocks free) before the next plan is made.

Tracing (DESIGN.md "Tracing"): with an OTLP endpoint, the loop notes when each sampled request was
first scheduled, got its first token and finished, and :class:`RequestSpans` turns that into the
request's ``queue``/``prefill``/``decode`` spans; without one, it does nothing at all.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Union

import zmq.asyncio

import proto
from proto.config import EngineConfig
from workers.actor import SUPERVISOR, Actor, Addresses, WorkerArgs
from workers.roster import executor_address, executor_name, executor_ranks
from workers.scheduler.rank_totals import RankTotals
from workers.scheduler.request_spans import RequestSpans
from workers.scheduler.scheduler import Scheduler
from workers.tracing import SCHEDULER_SERVICE, PresetSpanIds, setup_tracing, shutdown_tracing, tracing_enabled

logger = logging.getLogger(__name__)

SchedulerFactory = Callable[[EngineConfig, int, set[int], int, int], Scheduler]
Pending = Union[proto.AddRequest, proto.AbortRequests, proto.HostLease, proto.PrefetchCommand]


class SchedulerActor(Actor):
    def __init__(
        self,
        config: EngineConfig,
        addresses: Addresses,
        *,
        context: zmq.asyncio.Context | None = None,
        heartbeat_interval: float = 0.5,
        stats_interval: float = 0.05,
        scheduler_factory: SchedulerFactory = Scheduler,
    ) -> None:
        super().__init__(
            "scheduler",
            addresses.scheduler,
            context=context,
            supervisor=addresses.frontend,
            heartbeat_interval=heartbeat_interval,
        )
        self.config = config
        self.stats_interval = stats_interval
        self.scheduler: Scheduler | None = None
        self.model_info: proto.Ready | None = None
        self._scheduler_factory = scheduler_factory
        self._pending: list[Pending] = []  # adds and aborts in arrival order, applied between steps
        self._wake = asyncio.Event()
        # Plans sent and not yet answered, oldest first, each with the future of its result.
        self._in_flight: deque[tuple[proto.StepPlan, asyncio.Future[proto.StepResult]]] = deque()
        self._step_id = -1  # the last step whose result was processed
        self._last_result: proto.StepResult | None = None  # the last step's, for DemandReport
        self._reported_idle = False  # the last DemandReport said idle
        self._stats = proto.Stats()
        # Every tensor-parallel rank's own figures (Stats.ranks): rank 0's from its StepResults, the
        # others' from their RankStep messages, folded in as they come (never waited for).
        self.rank_totals = RankTotals(config.tensor_parallel_size)
        self._stats.ranks = self.rank_totals.ranks
        self._last_stats_time = 0.0
        span_ids = PresetSpanIds()
        self.tracer = setup_tracing(SCHEDULER_SERVICE, config, id_generator=span_ids)
        self.request_spans = RequestSpans(self.tracer, span_ids) if tracing_enabled(self.tracer) else None
        # Every tensor-parallel rank runs every plan; rank 0 ("executor") alone answers.
        self.executors = [executor_name(rank) for rank in executor_ranks(config)]
        for rank, name in enumerate(self.executors):
            self.connect(name, executor_address(addresses, rank))
        self.connect("frontend", addresses.frontend)
        self.has_memory_manager = bool(addresses.memory)
        self._lease_received = not self.has_memory_manager
        self._lease_id = 0  # the last HostLease applied, echoed in each DemandReport
        if self.has_memory_manager:
            self.connect("memory", addresses.memory)
        self.on(proto.AddRequest, self._enqueue)
        self.on(proto.AbortRequests, self._enqueue)
        self.on(proto.HostLease, self._enqueue)
        self.on(proto.PrefetchCommand, self._enqueue)
        self.on(proto.Ready, self.handle_executor_ready)
        self.on(proto.StepResult, self.handle_step_result)
        self.on(proto.RankStep, self.handle_rank_step)

    @classmethod
    def from_args(cls, args: WorkerArgs, context: zmq.asyncio.Context | None = None) -> SchedulerActor:
        """As a worker starts it; ``context``: the engine's shared one when actors run as threads."""
        return cls(args.config, args.addresses, context=context, heartbeat_interval=args.heartbeat_interval)

    # ---------------------------------------------------------------- handlers

    def _enqueue(self, message: Pending) -> None:
        self._pending.append(message)
        self._wake.set()

    def handle_executor_ready(self, ready: proto.Ready) -> None:
        if self.scheduler is not None:
            raise RuntimeError("the executor sent Ready twice")
        self.scheduler = self._scheduler_factory(
            self.config,
            ready.num_device_blocks,
            set(ready.eos_token_ids),
            ready.max_model_len,
            ready.max_host_blocks,
        )
        self._stats.num_device_blocks = ready.num_device_blocks
        self.model_info = proto.Ready(
            worker=self.name,
            pid=os.getpid(),
            num_device_blocks=ready.num_device_blocks,
            max_model_len=ready.max_model_len,
            eos_token_ids=ready.eos_token_ids,
            block_size=ready.block_size,
            vocab_size=ready.vocab_size,
            max_host_blocks=ready.max_host_blocks,
        )
        self.send(SUPERVISOR, self.model_info)
        self.spawn(self._step_loop(), "step-loop")

    def handle_step_result(self, result: proto.StepResult) -> None:
        # The executor answers plans in the order it got them: this is the oldest unanswered one's.
        unanswered = [(plan.step_id, future) for plan, future in self._in_flight if not future.done()]
        if not unanswered or result.step_id != unanswered[0][0]:
            expected = unanswered[0][0] if unanswered else None
            raise RuntimeError(f"unexpected StepResult for step {result.step_id} (waiting for {expected})")
        unanswered[0][1].set_result(result)

    def handle_rank_step(self, step: proto.RankStep) -> None:
        self.rank_totals.add_rank_step(step)
        if not self._in_flight and self.scheduler is not None:
            # No step in flight: the loop is idle, and its idle snapshot may have left before this
            # rank's last figures came. The last snapshot must reflect the quiescent engine.
            self._publish_stats(self.scheduler, force=True)

    async def on_stop(self) -> None:
        # Off the loop: the exporter may take a while to give up on an unreachable collector.
        await asyncio.get_running_loop().run_in_executor(None, shutdown_tracing, self.tracer)

    # ---------------------------------------------------------------- the step loop

    async def _step_loop(self) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        loop = asyncio.get_running_loop()
        stats = self._stats
        spans = self.request_spans
        in_flight = self._in_flight
        while True:
            started = time.perf_counter()
            # NOTE: from here to the await below nothing yields, so no message can slip in between
            # applying the pending queue, the idle check and clearing the wake-up event.
            self._apply_pending(scheduler)
            # With host memory, wait for the memory manager's first lease: the processes start in
            # parallel, and a request must not run on a pool whose host part is not granted yet.
            runnable = scheduler.has_unfinished() and (self._lease_received or not scheduler.num_host_blocks)
            plan = scheduler.schedule() if runnable and self._may_schedule(scheduler) else None
            if plan is None and not in_flight:
                # Idle, or nothing can run until a request arrives, is aborted or the lease grows.
                self._publish_stats(scheduler, force=True)
                self._report_demand(scheduler, self._step_id, idle=True)
                self._wake.clear()
                await self._wake.wait()
                continue
            if plan is not None:
                if self._reported_idle:
                    # Busy again: the memory manager must not read the silence of a long step as idle.
                    self._report_demand(scheduler, self._step_id)
                if spans is not None:
                    spans.scheduled(plan, scheduler.num_preemptions, time.time_ns())
                in_flight.append((plan, loop.create_future()))
                self._send_to_executors(plan)
                if len(in_flight) == 1 and self._may_schedule(scheduler):
                    continue  # async scheduling: plan the next step before awaiting this one
            # NOTE: the plan is popped only once its result is in, so a StepResult is always matched.
            plan, future = in_flight[0]
            result = await future
            in_flight.popleft()
            # NOTE: timed before the deltas leave: the API ends its span once it has the last one.
            stepped_ns = time.time_ns() if spans is not None else 0
            self._step_id = plan.step_id
            deltas = scheduler.postprocess(plan, result)
            if deltas:
                self.send("frontend", proto.TokenDeltas(deltas))
            if spans is not None:
                spans.stepped(deltas, stepped_ns)
            stats.num_steps += 1
            num_tokens = len(plan.token_ids) // 4  # packed int32
            stats.num_computed_tokens_total += num_tokens
            if not stats.iteration_tokens_bucket_counts:
                stats.iteration_tokens_bucket_counts = [0] * (len(proto.ITERATION_TOKENS_BUCKETS) + 1)
            stats.iteration_tokens_bucket_counts[bisect.bisect_left(proto.ITERATION_TOKENS_BUCKETS, num_tokens)] += 1
            stats.forward_seconds_total += result.forward_time
            stats.step_seconds_total += result.step_time
            stats.bytes_to_device_total += result.bytes_to_device
            stats.bytes_to_host_total += result.bytes_to_host
            stats.stall_seconds_total += result.stall_time
            stats.num_staging_blocks = result.num_staging_blocks
            stats.prefetch_depth = result.prefetch_depth
            self.rank_totals.add_result(result)
            stats.cycle_seconds_total += time.perf_counter() - started
            self._publish_stats(scheduler)
            self._last_result = result
            self._report_demand(scheduler, plan.step_id)

    def _may_schedule(self, scheduler: Scheduler) -> bool:
        """Whether a plan may be made now: none in flight, or (async scheduling) one that the next
        plan can follow without its tokens, on one executor rank."""
        return not self._in_flight or (scheduler.can_schedule() and len(self.executors) == 1)

    def _apply_pending(self, scheduler: Scheduler) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        deltas: list[proto.TokenDelta] = []
        spans = self.request_spans
        # Consecutive aborts (clients disconnecting together, one message each) are applied as one:
        # the running batch is then filtered once, not once per message.
        abort_ids: list[str] = []
        for message in pending:
            if isinstance(message, proto.AbortRequests):
                abort_ids += message.request_ids
                continue
            if abort_ids:
                deltas += scheduler.abort_requests(abort_ids)
                abort_ids = []
            if isinstance(message, proto.HostLease):
                self._apply_lease(scheduler, message)
                continue
            if isinstance(message, proto.PrefetchCommand):
                self._apply_prefetch(scheduler, message)
                continue
            # n choices came as one message (their lists crossed the wire once); they share them.
            for choice in message.choices():
                try:
                    deltas += scheduler.add_request(choice)
                    if spans is not None:
                        spans.arrived(choice, scheduler.requests.get(choice.request_id))
                except ValueError as error:
                    # A bad request (a duplicate id, say) fails alone; the engine stays up.
                    logger.warning("rejected request %s: %s", choice.request_id, error)
                    deltas.append(
                        proto.TokenDelta(
                            request_id=choice.request_id,
                            token_ids=b"",
                            finish_reason=proto.FinishReason.ERROR,
                            trace_context=choice.trace_context,
                            error=str(error),
                        )
                    )
        if abort_ids:
            deltas += scheduler.abort_requests(abort_ids)
        if deltas:
            finished_ns = time.time_ns()  # before the deltas leave, as in the step loop
            self.send("frontend", proto.TokenDeltas(deltas))
            if spans is not None:
                spans.finished(deltas, finished_ns)

    def _apply_lease(self, scheduler: Scheduler, lease: proto.HostLease) -> None:
        # NOTE: the executor takes this update after the plans in flight (none, or one with async
        # scheduling: made under the old lease) and before the next plan (same channel, in order):
        # new segments are mapped before any plan can use their blocks, and released ones are
        # unmapped only after the plan that migrated off them has run (DemandReport.release_safe
        # counts from the last plan made, in flight or not).
        if lease.attach or lease.detach:
            self._send_to_executors(proto.SegmentUpdate(lease.attach, lease.detach))
        if lease.lease != scheduler.host_lease:
            scheduler.set_host_lease(lease.lease)
        self._lease_received = True
        self._lease_id = lease.lease_id
        self._stats.host_lease_target = lease.target
        self._stats.host_decision = lease.reason
        self._stats.host_link_bandwidth = lease.link_bandwidth

    def _apply_prefetch(self, scheduler: Scheduler, command: proto.PrefetchCommand) -> None:
        # NOTE: every executor rank reshapes its ring after the plans in flight (made for the old
        # ring) and before the next plan (same channel, in order), which reads at most the new
        # ring's host blocks.
        self._send_to_executors(command)
        scheduler.set_host_step_limit(command.num_staging_blocks)

    def _send_to_executors(self, message: proto.StepPlan | proto.SegmentUpdate | proto.PrefetchCommand) -> None:
        for name in self.executors:
            self.send(name, message)

    def _report_demand(self, scheduler: Scheduler, completed_step_id: int, idle: bool = False) -> None:
        """Tell the memory manager what the controller needs: after a step, when going idle, and
        when leaving idle."""
        if not self.has_memory_manager or not scheduler.num_host_blocks:
            return
        self._reported_idle = idle
        last = self._last_result
        demand = scheduler.demand
        release_safe = (
            scheduler.host_blocks_above_lease == 0 and completed_step_id >= scheduler.host_release_step_id
        )
        self.send(
            "memory",
            proto.DemandReport(
                num_waiting=demand.num_waiting + demand.num_swapped,
                num_preemptions=demand.num_preemptions,
                num_host_blocks_in_use=scheduler.num_host_blocks_used,
                short_of_blocks=demand.short_of_blocks,
                host_lease=scheduler.host_lease,
                release_safe=release_safe,
                host_blocks_high_water=scheduler.host_blocks_high_water,
                idle=idle,
                step_time=last.step_time if last is not None else 0.0,
                link_bandwidth=last.link_bandwidth if last is not None else 0.0,
                lease_id=self._lease_id,
            ),
        )

    def _publish_stats(self, scheduler: Scheduler, force: bool = False) -> None:
        """Send Stats at most every ``stats_interval`` while busy, and always when going idle, so
        the frontend's last snapshot is never stale once the engine is quiet."""
        now = time.monotonic()
        if not force and now - self._last_stats_time < self.stats_interval:
            return
        if not scheduler.has_unfinished() and self._in_flight:
            # Async scheduling: the last requests finished but a step planned ahead still runs (their
            # wasted rows); a snapshot with nothing running would read as idle before the engine is.
            return
        self._last_stats_time = now
        stats = self._stats
        stats.num_running = scheduler.num_running
        stats.num_waiting = scheduler.num_waiting
        stats.device_usage = scheduler.usage
        stats.num_host_blocks = scheduler.num_host_blocks
        stats.host_lease = scheduler.host_lease
        stats.host_usage = scheduler.host_usage
        stats.num_host_blocks_used = scheduler.num_host_blocks_used
        stats.num_preemptions = scheduler.num_preemptions
        prefix = scheduler.prefix_cache_stats
        stats.prefix_cache_queries_total = prefix.num_query_tokens
        stats.prefix_cache_device_hits_total = prefix.num_device_hit_tokens
        stats.prefix_cache_host_hits_total = prefix.num_host_hit_tokens
        stats.prefix_cache_demotions_total = prefix.num_demotions
        stats.prefix_cache_promotions_total = prefix.num_promotions
        self.send("frontend", stats)
