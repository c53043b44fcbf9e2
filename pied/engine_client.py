"""The frontend's view of the engine: submit requests, receive their token deltas, abort, read stats.

Two implementations share this interface:
- ``pied.inproc.InprocEngineClient``: scheduler and executor in this process (tests, ``pied.LLM``).
- ``pied.mp_client.ProcessEngineClient``: the daemon's worker processes over ZeroMQ.
The API server and the output processor only ever see :class:`EngineClient`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

import proto


class EngineDeadError(RuntimeError):
    """The engine (a worker process) died or hung; every request in flight fails with this."""


class EngineStats(msgspec.Struct, kw_only=True):
    """A snapshot of the scheduler's state, refreshed every step."""

    num_running: int = 0
    num_waiting: int = 0
    num_device_blocks: int = 0
    num_host_blocks: int = 0
    device_usage: float = 0.0  # fraction of device KV blocks referenced
    host_usage: float = 0.0  # fraction of leased host KV blocks referenced
    num_preemptions: int = 0
    num_steps: int = 0
    # Host memory pooling: the lease (host blocks the scheduler may hold) and streaming totals.
    host_lease: int = 0
    bytes_to_device_total: int = 0
    bytes_to_host_total: int = 0
    stall_seconds_total: float = 0.0
    step_seconds_total: float = 0.0
    host_lease_target: int = 0  # the expansion controller's estimate of the transparent lease
    host_decision: str = ""  # its last decision and reason
    host_link_bandwidth: float = 0.0  # its host -> device bandwidth estimate, bytes/s (0: unknown)
    # Prefix caching, in tokens (like vLLM): tokens of admitted requests looked up, and those found
    # cached on each tier.
    prefix_cache_queries_total: int = 0
    prefix_cache_device_hits_total: int = 0
    prefix_cache_host_hits_total: int = 0


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
        """Submit a request; its deltas arrive on the returned stream."""

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests; each one's stream ends with a FinishReason.ABORT delta."""

    def stats(self) -> EngineStats:
        """The latest stats snapshot (cheap; no round trip)."""

    @property
    def dead(self) -> bool:
        """True once the engine has failed; new requests raise EngineDeadError."""

    async def shutdown(self) -> None:
        """Stop the engine: abort what is left, stop workers, free every resource."""
