"""The memory manager commands the staging ring end to end (workers/memory/prefetch.py): on a
throttled link the ring the executor runs with follows the PrefetchCommand down from the plan's
(the largest lease) to what one step's compute can stream, its pages are freed, the scheduler never
plans more host blocks per step than the ring holds, and greedy tokens stay those of device-only."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from engine_driver import collect, greedy, running_engine
from test_pooling import REQUESTS, reference_tokens
from tiny_models import build_model_dir

import proto


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("prefetch"), "llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    return asyncio.run(reference_tokens(model_dir))


class RingLog:
    """Wraps the executor's runner (threads only) to record, per step, the distinct host blocks the
    plan reads and the ring it ran with."""

    def __init__(self, runner) -> None:
        self.steps: list[tuple[int, int]] = []
        execute = runner.execute

        def logged(plan: proto.StepPlan) -> proto.StepResult:
            result = execute(plan)
            self.steps.append((result.num_host_blocks, result.num_staging_blocks))
            return result

        runner.execute = logged


@pytest.mark.parametrize("workers", ["threads", "processes"])
async def test_ring_follows_the_command_and_tokens_equal_device_only(model_dir, reference, workers):
    async with running_engine(
        model_dir,
        workers,
        device_kv_blocks=24,  # the batch overflows it about 5x
        kv_policy="pie",
        expansion="adaptive",
        host_kv_gib=0.002,
        extra={"copy_throttle_bytes_per_s": 2e6},  # a slow link: far fewer blocks than the budget
    ) as engine:
        info = engine.model_info
        assert info is not None
        capacity = info.max_host_blocks
        runner = engine.actor("executor").runner if workers == "threads" else None
        log = RingLog(runner) if runner is not None else None
        full_pages = runner.kv_pool.pages.shape[0] if runner is not None else 0
        if runner is not None:
            assert runner.staging.area_size == capacity  # the plan's ring, until a command
        # Demand in waves until the memory manager has narrowed the ring (a fast machine may
        # finish a wave before the first decision); every wave's tokens equal device-only.
        for wave in range(20):
            streams = [
                engine.add_request(proto.AddRequest(f"{rid}-{wave}", proto.pack_i32(prompt), greedy(20)))
                for rid, prompt in REQUESTS.items()
            ]
            outputs = await asyncio.wait_for(asyncio.gather(*(collect(stream) for stream in streams)), 300)
            assert {rid: tokens for rid, (tokens, _) in zip(REQUESTS, outputs)} == reference
            await engine.wait_idle()
            if 0 < engine.stats().num_staging_blocks < capacity:
                break
        stats = engine.stats()
        assert 0 < stats.num_staging_blocks < capacity, (stats.num_staging_blocks, capacity)
        print(f"ring {stats.num_staging_blocks} of {capacity} blocks, depth {stats.prefetch_depth}, wave {wave}")
        assert stats.prefetch_depth >= 1
        if runner is not None:
            memory = engine.actor("memory").host
            # The executor runs the ring the memory manager last commanded (an idle engine's lease
            # and ring may still narrow meanwhile: poll until both sides agree), its pages are gone.
            # The executor thread resizes the ring and then its pages: both are read in one snapshot
            # once they agree (reading them apart, CI once saw the ring of one resize and the pages of
            # the one before).
            def ring_and_pages() -> tuple[int, int, int]:
                ring = runner.staging
                pages = runner.kv_pool.pages.shape[0]
                return ring.area_size, pages, runner.num_device_blocks * runner.model_config.num_layers + ring.num_pages

            for _ in range(400):
                area, pages, expected = ring_and_pages()
                if area == memory.num_staging_blocks and pages == expected:
                    break
                await asyncio.sleep(0.05)
            assert area == memory.num_staging_blocks < capacity
            assert pages < full_pages
            assert pages == expected
            # No step read more host blocks than the ring it ran with held.
            blocks, widths = np.array(log.steps).T
            assert (blocks <= widths).all()
            assert engine.actor("scheduler").scheduler.host_lease <= runner.staging.area_size
