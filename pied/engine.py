"""``Engine``: the one :class:`~pied.engine_client.EngineClient`. The scheduler, executor and
memory-manager actors run as worker processes (the daemon) or as threads of this process
(``pied.LLM``, ``pied serve --inproc``, tests), started and watched by :mod:`pied.supervisor`; the
two differ only in wiring (``ipc://`` or ``inproc://``), never in what runs.

Usage (on the frontend's event loop)::

    engine = Engine(config, workers="processes")   # or "threads"
    await engine.start()                    # workers up and Ready, or WorkerStartError
    stream = engine.add_request(request)    # deltas arrive on the stream
    async for delta in stream: ...          # raises EngineDeadError if the engine dies
    await engine.wait_dead()                # the daemon exits non-zero when this returns
    await engine.shutdown()
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

import proto
from pied.engine_client import EngineDeadError, RequestStream
from pied.preflight import preflight
from pied.supervisor import Supervisor, SupervisorOptions, WorkerKind, WorkerStartError
from proto.config import EngineConfig
from workers.actor import Actor

logger = logging.getLogger(__name__)

__all__ = ["Engine", "SupervisorOptions", "WorkerKind", "WorkerStartError"]


class Engine:
    """The engine's actors behind the frontend. Every method runs on the loop that called
    :meth:`start`.

    ``on_dead(reason)`` (optional) is called once when a worker dies or hangs, after every stream
    in flight has failed with :class:`EngineDeadError`.
    """

    def __init__(
        self,
        config: EngineConfig,
        options: SupervisorOptions | None = None,
        on_dead: Callable[[str], None] | None = None,
        *,
        workers: WorkerKind = "processes",
    ) -> None:
        self.config = preflight(config)  # a no-op for a config the daemon checked already
        self.model_info: proto.Ready | None = None  # num_device_blocks, max_model_len, eos ids, ...
        self._stats = proto.Stats()  # the scheduler's latest snapshot
        # Set by an idle snapshot with no request open, cleared by a request or deltas: the
        # scheduler sends its idle snapshot after the deltas that emptied it, on the same socket.
        self._idle = asyncio.Event()
        self._streams: dict[str, RequestStream] = {}
        self._dead_event = asyncio.Event()
        self._on_dead_callback = on_dead
        self._supervisor = Supervisor(
            self.config,
            on_output=self._handle_output,
            on_dead=self._handle_dead,
            options=options,
            workers=workers,
        )
        self._started = False
        self._shut_down = False

    # ---------------------------------------------------------------- EngineClient

    async def start(self) -> None:
        self.model_info = await self._supervisor.start()
        self._stats.num_device_blocks = self.model_info.num_device_blocks
        self._started = True

    def add_request(self, request: proto.AddRequest) -> RequestStream:
        if request.params.n != 1:
            raise ValueError("a request with n > 1 has a stream per choice: submit it with add_choices().")
        return self.add_choices(request)[0]

    def add_choices(self, request: proto.AddRequest) -> list[RequestStream]:
        """Submit a request and its ``params.n`` choices as one message (its prompt and parameter
        lists cross to the scheduler once); one stream per choice of ``request.choices()``, in order."""
        if self.dead:
            raise EngineDeadError(f"engine is dead: {self.dead_reason}")
        if self._shut_down:
            raise EngineDeadError("engine shut down")
        if not self._started:
            raise RuntimeError("Engine.add_request() before start()")
        choice_ids = [choice.request_id for choice in request.choices()]
        for request_id in choice_ids:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use.")
        streams = [RequestStream(request_id) for request_id in choice_ids]
        for stream in streams:
            self._streams[stream.request_id] = stream
        was_idle = self._idle.is_set()
        self._idle.clear()
        try:
            self._supervisor.send(request)
        except BaseException:
            # Not sent (a message that cannot be encoded): no stream may wait for it, and an idle
            # engine stays idle for wait_idle.
            for stream in streams:
                self._streams.pop(stream.request_id, None)
            if was_idle and not self._streams:
                self._idle.set()
            raise
        return streams

    async def abort(self, request_ids: list[str]) -> None:
        # Only requests still open: the scheduler ignores unknown ids anyway, this saves a message.
        open_ids = [request_id for request_id in request_ids if request_id in self._streams]
        if open_ids and self._started and not self.dead and not self._supervisor.closed:
            self._supervisor.send(proto.AbortRequests(open_ids))

    def stats(self) -> proto.Stats:
        return self._stats

    async def wait_idle(self, timeout: float = 10.0) -> proto.Stats:
        """The snapshot of a quiescent engine: every request submitted so far has finished and the
        scheduler has reported itself idle since. Raises TimeoutError after ``timeout`` seconds
        and EngineDeadError if the engine dies meanwhile."""
        idle = asyncio.ensure_future(self._idle.wait())
        dead = asyncio.ensure_future(self._dead_event.wait())
        try:
            done, _ = await asyncio.wait([idle, dead], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            dead.cancel()
        if self.dead:
            raise EngineDeadError(f"engine is dead: {self.dead_reason}")
        if not done:
            raise TimeoutError(f"the engine did not go idle within {timeout:g}s")
        return self._stats

    @property
    def dead(self) -> bool:
        return self._supervisor.dead

    async def shutdown(self, drain_timeout: float = 2.0) -> None:
        """Abort what is left (each stream ends with an ABORT delta if the scheduler answers within
        ``drain_timeout``), stop the workers and free everything. Idempotent."""
        self._shut_down = True
        if self._streams and self._started and not self.dead:
            await self.abort(list(self._streams))
            deadline = time.monotonic() + drain_timeout
            while self._streams and not self.dead and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        await self._supervisor.shutdown()
        self._fail_all(EngineDeadError("engine shut down"))
        if self._supervisor.kind == "threads":
            return_freed_memory()

    # ---------------------------------------------------------------- liveness and facts

    @property
    def dead_reason(self) -> str:
        return self._supervisor.dead_reason

    async def wait_dead(self) -> str:
        """Return the reason once the engine has died (never returns after a clean shutdown)."""
        await self._dead_event.wait()
        return self.dead_reason

    @property
    def healthy(self) -> bool:
        """Every worker is up and heartbeating (the systemd watchdog pings only while this holds)."""
        return self._supervisor.heartbeats_fresh()

    @property
    def startup_progress(self) -> str:
        """Where each worker is while :meth:`start` runs (``executor loading, scheduler ready``)."""
        return self._supervisor.progress()

    @property
    def worker_pids(self) -> dict[str, int]:
        """``{name: pid}`` of every worker once started (this process's pid for threads)."""
        return self._supervisor.pids

    @property
    def workers(self) -> WorkerKind:
        return self._supervisor.kind

    def actor(self, name: str) -> Actor:
        """Worker ``name``'s actor object, with threads (tests and benchmarks read its state while
        the engine is idle); RuntimeError with processes."""
        return self._supervisor.actor(name)

    @property
    def max_model_len(self) -> int:
        assert self.model_info is not None, "max_model_len before start()"
        return self.model_info.max_model_len

    @property
    def vocab_size(self) -> int:
        assert self.model_info is not None, "vocab_size before start()"
        return self.model_info.vocab_size

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    # ---------------------------------------------------------------- from the supervisor

    def _handle_output(self, message: proto.TokenDeltas | proto.Stats) -> None:
        if isinstance(message, proto.Stats):
            self._stats = message
            if not self._streams and message.num_running == message.num_waiting == 0:
                self._idle.set()
            return
        self._idle.clear()
        streams = self._streams
        for delta in message.deltas:
            stream = streams.get(delta.request_id)
            if stream is None:
                continue  # already ended (failed, or a late delta after shutdown)
            stream.put(delta)
            if delta.finish_reason is not None:
                del streams[delta.request_id]

    def _handle_dead(self, reason: str) -> None:
        self._fail_all(EngineDeadError(f"engine is dead: {reason}"))
        self._dead_event.set()
        if self._on_dead_callback is not None:
            self._on_dead_callback(reason)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error)


def return_freed_memory() -> None:
    """Give the memory the stopped actor threads freed back to the system (glibc only).

    NOTE: the weights and the KV pool are allocated on the executor's compute thread, a new thread
    per engine, so glibc serves them from a per-thread malloc arena; freed, they stay in that arena
    (large blocks too: after a first large free glibc raises its mmap threshold), and a process that
    starts and stops in-process engines grew by about a model's size per cycle with nothing of the
    engine left alive. ``malloc_trim(0)`` returns the free pages of every arena.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)
