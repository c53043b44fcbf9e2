"""An in-process engine (actors as threads, as ``pied.LLM`` runs them) started and stopped again and
again leaves nothing behind: no thread, no open descriptor, no host KV segment mapped or held.
(RSS is not compared: the allocator keeps what it likes; ``Engine.shutdown`` trims what it can.)"""

from __future__ import annotations

import asyncio
import os
import threading
import time

from engine_driver import engine_threads, generate, running_engine

NUM_CYCLES = 3
SETTLE_SECONDS = 30.0  # generous: a loaded machine takes a while to end the actors' pool threads


def host_segments_mapped() -> int:
    with open("/proc/self/maps") as maps:
        return sum("pied-kv" in line for line in maps)


def open_descriptors() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed already
            continue
    return sorted(targets)


# asyncio's default executor names its workers asyncio_0, asyncio_1, ...: a pool of this test's loop,
# made on first use, reused, and grown (up to its cap) whenever two calls overlap, e.g. the
# supervisor's preload and another blocking call. Its size says nothing about what an engine left.
POOL_PREFIX = "asyncio_"
POOL_CAP = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default max_workers


def snapshot() -> tuple[int, int, int, int]:
    """(threads but tqdm's monitor and the loop's default executor, open descriptors, memfd segments
    held, segments mapped) of this process."""
    descriptors = open_descriptors()
    memfds = sum("pied-kv" in target for target in descriptors)
    threads = [name for name in engine_threads() if not name.startswith(POOL_PREFIX)]
    return len(threads), len(descriptors), memfds, host_segments_mapped()


def at_most(counts: tuple[int, ...], baseline: tuple[int, ...]) -> bool:
    # At most, not equal: what an earlier test of this process left winding down may end meanwhile.
    return all(count <= start for count, start in zip(counts, baseline))


async def settled(baseline: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """This process's counts once they are back to ``baseline`` (or the deadline passed)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    counts = snapshot()
    while not at_most(counts, baseline) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        counts = snapshot()
    return counts


async def test_starting_and_stopping_an_engine_leaves_no_thread_descriptor_or_segment(tiny_model_dir) -> None:
    model = tiny_model_dir("llama")
    requests = {f"r{i}": [1, 5 + i, 9, 13 + i, 17, 21] for i in range(4)}

    async def cycle() -> None:
        # fixed:16 maps a host segment at once; the pool overflows to it (4 requests, 8 blocks).
        async with running_engine(model, device_kv_blocks=8, kv_policy="pie", expansion="fixed:16") as engine:
            await generate(engine, requests, 8)
            threads, _, memfds, mapped = snapshot()
            assert threads > baseline[0] and memfds >= 1 and mapped >= 1, "the engine was not running"

    # The first engine of a process leaves what is made once and reused: this loop's default
    # executor (the supervisor's preload) and a pipe of its own.
    baseline = (snapshot()[0], 0, 0, 0)
    await cycle()
    baseline = snapshot()
    for index in range(NUM_CYCLES):
        await cycle()
        counts = await settled(baseline)
        names = [thread.name for thread in threading.enumerate()]
        assert at_most(counts, baseline), (index, counts, baseline, names)
        assert sum(name.startswith(POOL_PREFIX) for name in names) <= POOL_CAP, names  # a pool, not a leak
