"""The executor actor: owns the model runner and answers each StepPlan with a StepResult.

Mailbox: StepPlan, SegmentUpdate and PrefetchCommand (from the scheduler, in plan order), Shutdown.
It loads the model on its compute thread, then sends Ready (with the model's shape) to the
scheduler and the supervisor. Each forward pass runs on the compute thread too, so aborts,
heartbeats and shutdown are handled while it runs.

Step deadline (DESIGN.md "Processes"): heartbeats come from the loop, so they go on while a forward
pass never returns. The compute thread therefore notes each job it starts (a step, with the
:class:`StepDeadline` of ``--step-timeout`` or one derived from the measured step times; a host
segment update, with a generous fixed one) and the loop looks at it a few times a second: a job past
its deadline fails the executor (Dead to the supervisor: the engine dies, every request fails, the
daemon exits non-zero), which then stops without waiting for the stuck thread. A job is timed from
its own start, so a step queued behind a long segment update is not blamed for it.

Tracing (DESIGN.md "Tracing"): with an OTLP endpoint or a span collector (the memory manager), each
step is timed on the compute thread and its spans are built after its result has been sent
(:mod:`workers.executor.step_spans`); with neither, a plan goes straight to ``runner.execute``.

Tensor parallelism (DESIGN.md "Parallelism"): one executor per rank, each its own worker. Every rank
gets every StepPlan and SegmentUpdate from the scheduler and joins the same collectives; rank 0
alone samples, sends StepResults and Ready to the scheduler (the others report Ready to the
supervisor only, and after each step their own timings and bytes as a ``RankStep``, for /metrics).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import zmq.asyncio

import proto
from proto.config import EngineConfig
from workers.actor import SUPERVISOR, Actor, Addresses, WorkerArgs
from workers.executor.local_segments import LocalSegments
from workers.executor.step_deadline import WARMUP_SECONDS, StepDeadline
from workers.executor.step_hang import StepHang
from workers.executor.step_spans import StepSpans, StepTiming
from workers.fd_channel import FdClient
from workers.memory.spans import span_channel_tracer
from workers.roster import executor_address, executor_name
from workers.tracing import EXECUTOR_SERVICE, setup_tracing, shutdown_tracing, tracing_enabled

logger = logging.getLogger(__name__)

COMPUTE_WATCH_INTERVAL = 0.25  # seconds between looks at the compute thread's job
# (what, time.monotonic() at its start, deadline in seconds, where the deadline comes from)
ComputeJob = tuple[str, float, float, str]


class ModelShape(Protocol):
    eos_token_ids: frozenset[int] | set[int]
    max_position_embeddings: int
    vocab_size: int


class Runner(Protocol):
    """What the executor needs of ``workers.executor.runner.ModelRunner`` (tests pass fakes)."""

    num_device_blocks: int
    block_size: int
    model_config: ModelShape

    def execute(self, plan: proto.StepPlan) -> proto.StepResult: ...

    def close(self) -> None:
        """Stop background work (the copy engine) and unmap host memory."""


@runtime_checkable
class LayerTimedRunner(Runner, Protocol):
    """A runner that can time each layer of a step (for ``--trace-layers-every``): while
    ``record_layer_times`` is True, ``execute`` leaves in ``layer_times`` one ``LayerTime`` (or its
    leading ``(start, end, stall)``) per layer, times on ``time.perf_counter_ns()``'s clock and
    stall in seconds (``ModelRunner`` records them with ``workers.executor.layer_timer``)."""

    record_layer_times: bool
    layer_times: list[tuple]


def load_model_runner(config: EngineConfig) -> Runner:
    # Imported here: torch and the model code load in the worker process only.
    from workers.executor.parallel import init_tensor_parallel
    from workers.executor.runner import ModelRunner
    from workers.plan import local_device, plan_of

    # The rendezvous with the other ranks (a no-op for one), from the supervisor's torchrun variables.
    device_type = local_device(plan_of(config).device).split(":")[0]
    tensor_parallel = init_tensor_parallel(config.tensor_parallel_size, config.distributed_init_method, device_type)
    # Device, dtype, KV pool and staging ring from the config's plan (the daemon checked it).
    return ModelRunner(config, tensor_parallel=tensor_parallel)


def ready_message(worker: str, config: EngineConfig, runner: Runner) -> proto.Ready:
    """The model facts the scheduler and the frontend need, as the in-process engine derives them."""
    model = runner.model_config
    max_model_len = getattr(runner, "max_model_len", 0) or min(
        config.max_model_len or model.max_position_embeddings, model.max_position_embeddings
    )
    return proto.Ready(
        worker=worker,
        pid=os.getpid(),
        num_device_blocks=runner.num_device_blocks,
        max_model_len=max_model_len,
        eos_token_ids=sorted(model.eos_token_ids),
        block_size=runner.block_size,
        vocab_size=model.vocab_size,
        max_host_blocks=getattr(runner, "max_host_blocks", 0),
    )


class ExecutorActor(Actor):
    def __init__(
        self,
        config: EngineConfig,
        addresses: Addresses,
        *,
        context: zmq.asyncio.Context | None = None,
        heartbeat_interval: float = 0.5,
        runner_factory: Callable[[EngineConfig], Runner] = load_model_runner,
        span_collector: str | None = None,
        rank: int = 0,
    ) -> None:
        """``span_collector``: where the step spans go over ZeroMQ (the memory manager's address).
        ``rank``: this executor's tensor-parallel rank."""
        super().__init__(
            executor_name(rank),
            executor_address(addresses, rank),
            context=context,
            supervisor=addresses.frontend,
            heartbeat_interval=heartbeat_interval,
        )
        self.config = config
        self.rank = rank
        self.runner: Runner | None = None
        self._runner_factory = runner_factory
        self.tracer = setup_tracing(EXECUTOR_SERVICE, config)
        self.channel = None
        if span_collector is not None:
            self.channel = span_channel_tracer(EXECUTOR_SERVICE, span_collector, self.context)
        self.step_spans: StepSpans | None = None
        # Host segments' descriptors come from the memory manager over SCM_RIGHTS (not /proc).
        self.segment_fds: FdClient | LocalSegments | None = None
        if config.node_rank > 0:
            # On another machine than the memory manager: this rank makes its own part of each segment.
            self.segment_fds = LocalSegments.for_config(config)
        elif addresses.memory:
            self.segment_fds = FdClient(addresses.memory)
        if tracing_enabled(self.tracer) or self.channel is not None:
            rank_label = rank if config.tensor_parallel_size > 1 else None
            self.step_spans = StepSpans(self.tracer, self.channel, config.trace_layers_every, rank_label)
        self.step_deadline = StepDeadline(config.step_timeout)
        self._step_deadline_source = (
            "--step-timeout" if config.step_timeout else "derived from the step times"
        )
        # NOTE: written by the compute thread, read by the loop's watch (a tuple swap: atomic).
        self._compute_job: ComputeJob | None = None
        self._runner_ready = asyncio.Event()
        self.stuck_job: str | None = None  # the compute job that ran past its deadline, if one did
        self._hang = StepHang.from_environment()  # None unless a test asks for a hang
        self.connect("scheduler", addresses.scheduler)
        self.on(proto.StepPlan, self.handle_step_plan)
        self.on(proto.SegmentUpdate, self.handle_segment_update)
        self.on(proto.PrefetchCommand, self.handle_prefetch_command)

    @classmethod
    def from_args(cls, args: WorkerArgs, context: zmq.asyncio.Context | None = None) -> ExecutorActor:
        """As a worker starts it; ``context``: the engine's shared one when actors run as threads."""
        # Every rank's step spans: the controller steers by the slowest rank's.
        collector = args.addresses.memory or None
        return cls(
            args.config,
            args.addresses,
            context=context,
            heartbeat_interval=args.heartbeat_interval,
            span_collector=collector,
            rank=args.rank,
        )

    async def on_start(self) -> None:
        # A load error raises here and fails the actor: the supervisor gets Dead with the reason.
        self.runner = await self.run_blocking(self._runner_factory, self.config)
        # Plans, segment updates and prefetch commands that arrived while the model loaded (a rank
        # other than 0 may still be loading when rank 0's Ready starts the scheduler) wait for this.
        self._runner_ready.set()
        ready = ready_message(self.name, self.config, self.runner)
        if self.rank == 0:
            self.send("scheduler", ready)
        self.send(SUPERVISOR, ready)
        self.spawn(self._watch_compute(), "compute-watch")

    async def on_stop(self) -> None:
        runner, self.runner = self.runner, None
        stuck = self.stuck_job is not None
        if self._hang is not None:
            self._hang.release()  # test only: the "stuck" pass returns, so the runner closes as usual
            stuck = False
        if stuck:
            # NOTE: close would queue behind the stuck pass on the compute thread and never run; the
            # process is about to exit, which frees the device and unmaps host memory anyway.
            logger.error("not closing the model runner: %s is stuck on the compute thread", self.stuck_job)
        elif runner is not None:
            # On the compute thread, after any forward pass still running there: as a thread of a
            # library's process, the executor must leave no copy thread or mapping behind, and
            # its weights and KV pool go with the last reference, not at the next cyclic GC.
            await self.run_blocking(runner.close)
            del runner
        if self.segment_fds is not None:
            self.segment_fds.close()
        # Off the loop: the exporter may take a while to give up on an unreachable collector.
        loop = asyncio.get_running_loop()
        for tracer in (self.tracer, self.channel):
            if tracer is not None:
                await loop.run_in_executor(None, shutdown_tracing, tracer)

    def handle_segment_update(self, update: proto.SegmentUpdate) -> None:
        # NOTE: through the compute thread like the plans, so it lands between the plans it came
        # between: new segments are mapped before the first plan that may use their blocks.
        self.spawn(self._when_ready(self._update_segments, update), "segments")

    async def _when_ready(self, function: Callable[..., object], *args: object) -> None:
        """``function(*args)`` on the compute thread once the runner exists. NOTE: waiters wake in
        the order they waited, and a set event returns at once, so messages keep their order."""
        await self._runner_ready.wait()
        await self.run_blocking(function, *args)

    def _update_segments(self, update: proto.SegmentUpdate) -> None:
        runner = self.runner
        assert runner is not None, "SegmentUpdate before the executor was ready"
        # Mapping (and on CUDA registering) segments takes seconds at most; a copy deadlock, forever.
        deadline = max(self.step_deadline.seconds(), WARMUP_SECONDS)
        self._compute_job = ("a host segment update", time.monotonic(), deadline, "host segment updates")
        try:
            if update.attach:
                if self.segment_fds is None:
                    raise RuntimeError(
                        "host segments to map, but this engine has no memory manager to hand them over."
                    )
                runner.attach_host_segments(update.attach, self.segment_fds.open)  # type: ignore[attr-defined]
            if update.detach:
                runner.detach_host_segments(update.detach)  # type: ignore[attr-defined]
        finally:
            self._compute_job = None

    def handle_prefetch_command(self, command: proto.PrefetchCommand) -> None:
        # NOTE: through the compute thread like the plans, so the ring is reshaped between the
        # plans the command came between, never during a step.
        self.spawn(self._when_ready(self._resize_staging, command), "prefetch")

    def _resize_staging(self, command: proto.PrefetchCommand) -> None:
        runner = self.runner
        assert runner is not None, "PrefetchCommand before the executor was ready"
        runner.resize_staging(command.prefetch_depth, command.num_staging_blocks)  # type: ignore[attr-defined]

    def handle_step_plan(self, plan: proto.StepPlan) -> None:
        # NOTE: with async scheduling the next plan arrives while this one runs; run_blocking
        # serialises forward passes on one thread in arrival order, so plans never overlap or
        # reorder, and a plan's placeholders are filled from the step that ran just before it.
        self.spawn(self._execute(plan), f"step-{plan.step_id}")

    async def _execute(self, plan: proto.StepPlan) -> None:
        await self._runner_ready.wait()
        runner = self.runner
        assert runner is not None, "StepPlan before the executor was ready"
        # A forward pass that raises fails the executor (and with it the engine), as in vLLM v1: the
        # device state after a failed kernel cannot be trusted.
        spans = self.step_spans
        time_layers = None
        if spans is not None:
            spans.begin(plan)
            time_layers = spans.samples_layers(plan)
        deadline = self.step_deadline.seconds()
        result, timing, elapsed = await self.run_blocking(
            self._compute_step, runner, plan, time_layers, deadline
        )
        self.step_deadline.record(elapsed)
        if self.rank == 0:  # the other ranks' results carry no tokens
            self.send("scheduler", result)
        else:  # only this rank's own figures, for /metrics (the scheduler never waits for them)
            self.send("scheduler", rank_step(self.rank, result))
        if spans is not None:
            assert timing is not None
            spans.end(plan, result, timing)  # while the scheduler plans the next step

    def _compute_step(
        self, runner: Runner, plan: proto.StepPlan, time_layers: bool | None, deadline: float
    ) -> tuple[proto.StepResult, StepTiming | None, float]:
        """On the compute thread: the forward pass (timed for spans unless ``time_layers`` is None),
        watched by :meth:`_watch_compute`; also returns how long it took."""
        started = time.monotonic()
        self._compute_job = (f"step {plan.step_id}", started, deadline, self._step_deadline_source)
        try:
            if self._hang is not None:
                self._hang.before_step(plan)
            if time_layers is None:
                result, timing = runner.execute(plan), None
            else:
                result, timing = timed_execute(runner, plan, time_layers)
        finally:
            self._compute_job = None
        return result, timing, time.monotonic() - started

    async def _watch_compute(self) -> None:
        """Fail the executor once the compute thread's job has run past its deadline."""
        while True:
            await asyncio.sleep(COMPUTE_WATCH_INTERVAL)
            job = self._compute_job
            if job is None:
                continue
            what, started, deadline, source = job
            if time.monotonic() - started > deadline:
                self.stuck_job = what
                self.fail(
                    f"{what} did not return within its deadline of {deadline:g} s ({source}): "
                    "the compute thread is stuck"
                )
                return


def rank_step(rank: int, result: proto.StepResult) -> proto.RankStep:
    return proto.RankStep(
        step_id=result.step_id,
        rank=rank,
        step_time=result.step_time,
        forward_time=result.forward_time,
        stall_time=result.stall_time,
        bytes_to_device=result.bytes_to_device,
        bytes_to_host=result.bytes_to_host,
        num_staging_blocks=result.num_staging_blocks,
    )


def timed_execute(
    runner: Runner, plan: proto.StepPlan, time_layers: bool
) -> tuple[proto.StepResult, StepTiming]:
    """``runner.execute(plan)`` timed where it runs, on the compute thread (no loop hop inside the
    measurement); with ``time_layers``, also each layer's times if the runner can take them."""
    layer_timed = runner if time_layers and isinstance(runner, LayerTimedRunner) else None
    if layer_timed is not None:
        layer_timed.record_layer_times = True
    start_ns, perf_start_ns = time.time_ns(), time.perf_counter_ns()
    try:
        result = runner.execute(plan)
    finally:
        if layer_timed is not None:
            layer_timed.record_layer_times = False
    end_ns = start_ns + time.perf_counter_ns() - perf_start_ns
    layer_times = list(layer_timed.layer_times) if layer_timed is not None else None
    return result, StepTiming(start_ns, end_ns, perf_start_ns, layer_times)
