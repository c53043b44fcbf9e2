"""The frontend's view of the engine: submit requests, receive their token deltas, abort, read
stats, watch its liveness.

One implementation, ``pied.engine.Engine``: the scheduler, executor and memory-manager actors, as
worker processes (the daemon) or as threads of this process (``pied.LLM``, ``--inproc``). The API
server, the daemon and the output processor only ever see :class:`EngineClient`; its stats are the
wire snapshot ``proto.Stats`` itself (one structure from the scheduler to ``/metrics``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import proto


class EngineDeadError(RuntimeError):
    """The engine (a worker process) died or hung; every request in flight fails with this."""


class RequestStream:
    """The deltas of one request, in order; ends after the delta with a finish_reason.

    Fed by the engine client's receive loop (``put``/``fail``), consumed by one frontend task.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[proto.TokenDelta | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, delta: proto.TokenDelta) -> None:
        self._queue.put_nowait(delta)

    def fail(self, error: BaseException) -> None:
        self._queue.put_nowait(error)

    def __aiter__(self) -> AsyncIterator[proto.TokenDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[proto.TokenDelta]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finish_reason is not None:
                self.finished = True
            yield item


class EngineClient(Protocol):
    """What the frontend needs from the engine. All methods are called on the frontend's loop."""

    async def start(self) -> None:
        """Start the engine; returns once it is ready to take requests (or raises)."""

    def add_request(self, request: proto.AddRequest) -> RequestStream:
        """Submit a request with ``params.n == 1``; its deltas arrive on the returned stream."""

    def add_choices(self, request: proto.AddRequest) -> list[RequestStream]:
        """Submit a request and its ``params.n`` choices as one message; one stream per choice
        (``request.choices()``, in order)."""

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests; each one's stream ends with a FinishReason.ABORT delta."""

    def stats(self) -> proto.Stats:
        """The latest stats snapshot (cheap; no round trip)."""

    async def wait_idle(self, timeout: float = 10.0) -> proto.Stats:
        """The snapshot of a quiescent engine, once every request submitted so far has finished."""

    async def shutdown(self) -> None:
        """Stop the engine: abort what is left, stop workers, free every resource."""

    @property
    def dead(self) -> bool:
        """True once the engine has failed; new requests raise EngineDeadError."""

    @property
    def dead_reason(self) -> str:
        """Why it died (empty while alive)."""

    async def wait_dead(self) -> str:
        """Returns the reason once the engine has died (never after a clean shutdown)."""

    @property
    def healthy(self) -> bool:
        """Every worker is up and heartbeating (the systemd watchdog pings only while this holds)."""

    @property
    def startup_progress(self) -> str:
        """Where each worker is while :meth:`start` runs (``executor loading, scheduler ready``)."""

    @property
    def worker_pids(self) -> dict[str, int]:
        """``{name: pid}`` of every worker once started."""

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt plus output) the engine accepts; after :meth:`start`."""

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size; after :meth:`start`."""

    @property
    def num_open_requests(self) -> int:
        """Requests whose stream has not ended yet."""
