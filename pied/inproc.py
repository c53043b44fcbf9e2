"""The engine in one process: scheduler and model runner driven by one loop.

``EngineCore.step()`` reads like the algorithm: schedule, execute, postprocess.
``InprocEngineClient`` runs that loop on a thread behind the async ``EngineClient`` interface,
for tests and library use; the daemon uses the same Scheduler and ModelRunner in worker processes.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

import proto
from pied.engine_client import EngineDeadError, EngineStats, RequestStream
from pied.preflight import preflight
from proto.config import EngineConfig
from workers.executor.runner import ModelRunner
from workers.memory.manager import HostMemory, LeaseChange
from workers.scheduler.scheduler import Scheduler


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = preflight(config)  # no-op for a config the daemon checked already
        self.host = HostMemory(self.config)
        self.runner = ModelRunner(self.config)
        model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = set(model_config.eos_token_ids)
        self.scheduler = Scheduler(
            self.config,
            self.runner.num_device_blocks,
            self.eos_token_ids,
            self.max_model_len,
            num_host_blocks=self.host.max_host_blocks,
        )
        self._apply(self.host.start())
        self.num_steps = 0
        self.totals = StepTotals()

    def add_request(self, request: proto.AddRequest) -> list[proto.TokenDelta]:
        """Usually no deltas; one final ERROR delta for a request the scheduler can never run."""
        return self.scheduler.add_request(request)

    def abort(self, request_ids: list[str]) -> list[proto.TokenDelta]:
        return self.scheduler.abort_requests(request_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[proto.TokenDelta]:
        plan = self.scheduler.schedule()
        if plan is None:
            # Unfinished requests but nothing runnable: the lease is too small; an idle tick lets
            # the controller see the demand.
            self.steer_host_memory(None)
            return []
        result = self.runner.execute(plan)
        self.num_steps += 1
        self.totals.add(result)
        deltas = self.scheduler.postprocess(plan, result)
        # NOTE: after the step that migrated blocks off released segments has run, not before.
        self._release_host_memory(plan.step_id)
        self.steer_host_memory(result)
        return deltas

    def steer_host_memory(self, result: proto.StepResult | None) -> None:
        """Feed the expansion controller (``None``: an idle tick) and apply its decision."""
        scheduler = self.scheduler
        demand = scheduler.demand
        change = self.host.on_step(
            result,
            demand.num_waiting + demand.num_swapped,
            demand.num_preemptions,
            scheduler.num_host_blocks_used,
            demand.short_of_blocks,
            scheduler.host_blocks_high_water,
        )
        if change is not None:
            self._apply(change)

    def _apply(self, change: LeaseChange) -> None:
        # NOTE: map new segments before the scheduler may hand out their blocks.
        if change.attach:
            self.runner.attach_host_segments(change.attach)
        self.scheduler.set_host_lease(change.lease)

    def _release_host_memory(self, completed_step_id: int) -> None:
        scheduler = self.scheduler
        if completed_step_id < scheduler.host_release_step_id:
            return
        released = self.host.release_ready(scheduler.host_lease, scheduler.host_blocks_above_lease)
        if released:
            self.runner.detach_host_segments(released)

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_device_blocks=self.runner.num_device_blocks,
            num_host_blocks=self.host.max_host_blocks,
            device_usage=scheduler.usage,
            host_usage=scheduler.host_usage,
            num_preemptions=scheduler.num_preemptions,
            num_steps=self.num_steps,
            host_lease=scheduler.host_lease,
            bytes_to_device_total=self.totals.bytes_to_device,
            bytes_to_host_total=self.totals.bytes_to_host,
            stall_seconds_total=self.totals.stall_time,
            step_seconds_total=self.totals.step_time,
            prefix_cache_queries_total=scheduler.prefix_cache_stats.num_query_tokens,
            prefix_cache_device_hits_total=scheduler.prefix_cache_stats.num_device_hit_tokens,
            prefix_cache_host_hits_total=scheduler.prefix_cache_stats.num_host_hit_tokens,
            host_lease_target=self.host.target,
            host_decision=self.host.decision_reason,
            host_link_bandwidth=self.host.link_bandwidth,
        )

    def close(self) -> None:
        self.runner.close()  # stops the copy engine and unmaps every host segment
        self.host.close()


class StepTotals:
    """Running sums over every step's result (for /metrics and benchmarks)."""

    def __init__(self) -> None:
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self.stall_time = 0.0
        self.step_time = 0.0
        self.forward_time = 0.0

    def add(self, result: proto.StepResult) -> None:
        self.bytes_to_device += result.bytes_to_device
        self.bytes_to_host += result.bytes_to_host
        self.stall_time += result.stall_time
        self.step_time += result.step_time
        self.forward_time += result.forward_time


class InprocEngineClient:
    """``EngineClient`` over an ``EngineCore`` stepping on a background thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core: EngineCore | None = None
        self._inbox: deque[proto.AddRequest | proto.AbortRequests | None] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._stats = EngineStats()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- EngineClient

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.core = await asyncio.to_thread(EngineCore, self.config)
        self._stats = self.core.stats()
        self._thread = threading.Thread(target=self._run, name="pied-engine", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        assert self.core is not None
        return self.core.max_model_len

    @property
    def dead(self) -> bool:
        return self._error is not None

    def add_request(self, request: proto.AddRequest) -> RequestStream:
        if self._error is not None:
            raise EngineDeadError(f"engine is dead: {self._error}")
        stream = RequestStream(request.request_id)
        self._streams[request.request_id] = stream
        self._send(request)
        return stream

    async def abort(self, request_ids: list[str]) -> None:
        self._send(proto.AbortRequests(list(request_ids)))

    def stats(self) -> EngineStats:
        return self._stats

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._send(None)
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None
        self._fail_all(EngineDeadError("engine shut down"))

    # ---------------------------------------------------------------- engine thread

    def _send(self, message: proto.AddRequest | proto.AbortRequests | None) -> None:
        self._inbox.append(message)
        self._wake.set()

    def _run(self) -> None:
        core = self.core
        assert core is not None
        try:
            while True:
                while self._inbox:
                    message = self._inbox.popleft()
                    if message is None:
                        self._deliver(core.abort([r for r in list(self._streams)]))
                        return
                    if isinstance(message, proto.AddRequest):
                        self._deliver(core.add_request(message))
                    else:
                        self._deliver(core.abort(message.request_ids))
                if not core.has_unfinished():
                    self._stats = core.stats()  # going idle: aborts may have freed blocks since the last step
                    self._wake.wait()
                    self._wake.clear()
                    continue
                deltas = core.step()
                self._stats = core.stats()
                self._deliver(deltas)
        except BaseException as error:  # noqa: BLE001 - the engine failing must reach every caller
            self._error = error
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"engine failed: {error!r}"))

    def _deliver(self, deltas: list[proto.TokenDelta]) -> None:
        if deltas and self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, deltas)

    def _dispatch(self, deltas: list[proto.TokenDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            stream.put(delta)
            if delta.finish_reason is not None:
                del self._streams[delta.request_id]

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error)
