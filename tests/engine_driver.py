"""Drive the one engine (``pied.engine.Engine``, its actors as threads of the test process) from
tests: greedy generation, workloads with arrivals and aborts, and checks that nothing leaked.

With threads, a test reaches the actors' own objects (``engine.actor("scheduler").scheduler``,
``engine.actor("executor").runner``, ``engine.actor("memory").host``) and reads them once the
engine is idle (:meth:`Engine.wait_idle`), as it would read any object of its process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

import proto
from pied.engine import Engine, SupervisorOptions, WorkerKind
from proto.config import EngineConfig

BLOCK_SIZE = 4
# Generous: a loaded 2-core machine runs several suites at once.
OPTIONS = SupervisorOptions(startup_timeout=300, heartbeat_timeout=30.0)
Workload = list[dict[str, Any]]


def engine_config(model_dir: Path | str, **overrides: Any) -> EngineConfig:
    values: dict[str, Any] = dict(model=str(model_dir), dtype="float32", block_size=BLOCK_SIZE)
    values.update(overrides)
    return EngineConfig(**values)


@contextlib.asynccontextmanager
async def running_engine(
    model_dir: Path | str, workers: WorkerKind = "threads", **overrides: Any
) -> AsyncIterator[Engine]:
    engine = Engine(engine_config(model_dir, **overrides), OPTIONS, workers=workers)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


def greedy(max_tokens: int) -> proto.SamplingParams:
    return proto.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


async def collect(stream: Any) -> tuple[list[int], proto.TokenDelta]:
    """A stream's tokens and its final delta."""
    tokens: list[int] = []
    last = None
    async for delta in stream:
        tokens.extend(proto.unpack_i32(delta.token_ids).tolist())
        last = delta
    assert last is not None
    return tokens, last


def random_prompts(count: int, seed: int, length: int = 40) -> dict[str, list[int]]:
    """``count`` prompts of token 1 and ``length`` seeded random tokens, by request id r0, r1, ..."""
    rng = np.random.default_rng(seed)
    return {f"r{i}": [1] + rng.integers(5, 500, size=length).tolist() for i in range(count)}


async def generate(
    engine: Engine, requests: dict[str, list[int]], max_tokens: int, timeout: float = 120
) -> dict[str, list[int]]:
    """Greedy tokens per request id, all submitted at once; each must finish by length. Returns
    once the engine is idle again."""
    streams = {
        request_id: engine.add_request(proto.AddRequest(request_id, proto.pack_i32(prompt), greedy(max_tokens)))
        for request_id, prompt in requests.items()
    }
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams.values())), timeout)
    for request_id, (_, last) in zip(streams, results):
        assert last.finish_reason == proto.FinishReason.LENGTH, (request_id, last)
    await engine.wait_idle()
    return {request_id: tokens for request_id, (tokens, _) in zip(streams, results)}


async def drive(engine: Engine, workload: Workload) -> dict[str, tuple[list[int], proto.FinishReason]]:
    """Submit each request of ``workload`` once ``arrival`` tokens have come back (all requests
    together: the driver's clock), abort it at ``abort_at`` tokens; returns every request's tokens
    and finish reason. When nothing is open, the clock jumps to the next arrival."""
    outputs: dict[str, list[int]] = {}
    finish: dict[str, proto.FinishReason] = {}
    clock = 0
    progress = asyncio.Event()

    async def consume(request_id: str, stream: Any) -> None:
        nonlocal clock
        async for delta in stream:
            tokens = proto.unpack_i32(delta.token_ids).tolist()
            outputs[request_id].extend(tokens)
            clock += len(tokens)
            if delta.finish_reason is not None:
                finish[request_id] = delta.finish_reason
            progress.set()

    waiting = sorted(workload, key=lambda request: request["arrival"])
    to_abort = [request for request in workload if request["abort_at"] is not None]
    tasks = []
    while waiting or len(finish) < len(outputs):
        if waiting and len(finish) == len(outputs):
            clock = max(clock, waiting[0]["arrival"])
        while waiting and waiting[0]["arrival"] <= clock:
            request = waiting.pop(0)
            outputs[request["id"]] = []
            params = greedy(request["max_tokens"])
            add = proto.AddRequest(request["id"], proto.pack_i32(request["prompt"]), params)
            tasks.append(asyncio.ensure_future(consume(request["id"], engine.add_request(add))))
        due = [r["id"] for r in to_abort if r["abort_at"] <= clock and r["id"] in outputs]
        if due:
            to_abort = [r for r in to_abort if r["id"] not in due]
            await engine.abort(due)
        if len(finish) < len(outputs):
            progress.clear()
            await asyncio.wait_for(progress.wait(), 60)
    await asyncio.gather(*tasks)
    await engine.wait_idle()
    return {request_id: (outputs[request_id], finish[request_id]) for request_id in outputs}


def assert_tokens_match(
    pooled: dict[str, tuple[list[int], proto.FinishReason]],
    reference: dict[str, tuple[list[int], proto.FinishReason]],
) -> None:
    for request_id, (tokens, reason) in pooled.items():
        reference_tokens, reference_reason = reference[request_id]
        if proto.FinishReason.ABORT in (reason, reference_reason):
            # An abort lands wherever each run happens to be in the request.
            n = min(len(tokens), len(reference_tokens))
            assert tokens[:n] == reference_tokens[:n], request_id
        else:
            assert (tokens, reason) == (reference_tokens, reference_reason), request_id


def assert_all_free(engine: Engine) -> None:
    """Idle, with no block of either tier held (the prefix cache may keep free cached blocks)."""
    scheduler = engine.actor("scheduler").scheduler
    assert not scheduler.has_unfinished()
    assert scheduler.usage == 0.0 and scheduler.host_usage == 0.0
    assert scheduler.num_host_blocks_used == 0
    assert scheduler.block_manager.num_free == engine.actor("executor").runner.num_device_blocks
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.device_usage == 0.0 and stats.host_usage == 0.0


def engine_threads() -> list[str]:
    """Every Python thread of this process but tqdm's monitor (started by building a model)."""
    return sorted(thread.name for thread in threading.enumerate() if thread.name != "tqdm_monitor")


def open_memfds(pid: int | None = None) -> int:
    """Host segments (memfd descriptors) process ``pid`` (default: this one) holds open."""
    directory = f"/proc/{pid or os.getpid()}/fd"
    count = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for fd in names:
        try:
            if os.readlink(f"{directory}/{fd}").startswith("/memfd:pied-kv"):
                count += 1
        except OSError:
            pass
    return count


def mapped_segments(pid: int | None = None) -> int:
    """Host segments (memfds) mapped into process ``pid``'s (default: this one's) address space."""
    try:
        with open(f"/proc/{pid or os.getpid()}/maps") as maps:
            return sum("/memfd:pied-kv" in line for line in maps)
    except FileNotFoundError:
        return 0


class LeaseWaves:
    """Waves of one batch of greedy requests through ``client``, each checked token for token
    against ``reference``, with the host lease sampled every 20 ms while they run (``on_sample``
    adds a test's own sampling). Driven until a condition holds, so it does not depend on how fast
    the machine is."""

    def __init__(
        self,
        client: Engine,
        requests: dict[str, list[int]],
        reference: dict[str, list[int]],
        max_tokens: int,
        on_sample: Callable[[], None] | None = None,
    ) -> None:
        self.client, self.requests, self.reference = client, requests, reference
        self.max_tokens, self.on_sample = max_tokens, on_sample
        self.samples: list[tuple[int, str]] = []  # (lease, decision)
        self.count = 0

    async def watch(self) -> None:
        while True:
            stats = self.client.stats()
            self.samples.append((stats.host_lease, stats.host_decision))
            if self.on_sample is not None:
                self.on_sample()
            await asyncio.sleep(0.02)

    async def wave(self) -> list[int]:
        """One wave of the batch; the leases seen while it ran."""
        first = len(self.samples)
        streams = [
            self.client.add_request(
                proto.AddRequest(f"{request_id}-{self.count}", proto.pack_i32(prompt), greedy(self.max_tokens))
            )
            for request_id, prompt in self.requests.items()
        ]
        self.count += 1
        outputs = await asyncio.wait_for(asyncio.gather(*(collect(stream) for stream in streams)), 300)
        assert {request_id: tokens for request_id, (tokens, _) in zip(self.requests, outputs)} == self.reference
        return [lease for lease, _ in self.samples[first:]]

    async def grow(self, at_least: int, max_waves: int = 10) -> int:
        """Waves until the lease has reached ``at_least`` (at most ``max_waves``); the peak seen."""
        peak = 0
        for _ in range(max_waves):
            peak = max([peak, *await self.wave()])
            if peak >= at_least:
                break
        return peak

    async def settle_at_most(self, limit: int, max_waves: int = 15) -> list[int]:
        """Waves until a whole wave runs at ``limit`` or less (at most ``max_waves``); the leases
        the last wave saw."""
        leases = [limit + 1]
        for _ in range(max_waves):
            leases = await self.wave()
            if max(leases) <= limit:
                break
        return leases

    def decided(self, prefix: str) -> bool:
        return any(decision.startswith(prefix) for _, decision in self.samples)
