"""The staging ring's sizing from the controller's measurements (workers/memory/prefetch.py)."""

from __future__ import annotations

import pytest

from workers.memory.controller import StepSample
from workers.memory.prefetch import HEADROOM, PrefetchPlan, PrefetchPlanner, plan_prefetch

MB = 1 << 20


def test_ring_is_what_one_steps_compute_can_stream_not_the_largest_lease():
    # 100 MB/s, 20 ms of compute: 2 MB per step, blocks of 64 KiB -> 32 blocks transparent.
    plan = plan_prefetch(100 * MB, 0.02, num_layers=8, block_bytes=64 << 10, capacity=4096)
    assert plan.num_staging_blocks == pytest.approx(HEADROOM * 32, abs=1)
    assert plan.depth == 1  # one layer's load at that lease takes one layer's compute
    assert plan.num_areas(8) == 2


def test_ring_scales_with_bandwidth_and_compute_and_is_capped():
    base = plan_prefetch(100 * MB, 0.02, 8, 64 << 10, 4096).num_staging_blocks
    assert plan_prefetch(25 * MB, 0.02, 8, 64 << 10, 4096).num_staging_blocks == pytest.approx(base / 4, abs=1)
    assert plan_prefetch(100 * MB, 0.04, 8, 64 << 10, 4096).num_staging_blocks == pytest.approx(base * 2, abs=1)
    assert plan_prefetch(100 * MB, 10.0, 8, 64 << 10, 100).num_staging_blocks == 100
    assert plan_prefetch(1.0, 1e-3, 8, 64 << 10, 100).num_staging_blocks == 1  # never empty


def test_controller_target_above_the_model_widens_the_ring_and_deepens_the_prefetch():
    model = plan_prefetch(100 * MB, 0.02, 8, 64 << 10, 4096)
    calibrated = plan_prefetch(100 * MB, 0.02, 8, 64 << 10, 4096, target_blocks=96)
    assert calibrated.num_staging_blocks == 144 > model.num_staging_blocks
    assert calibrated.depth == 3  # 96 blocks' layer load takes three layers of compute
    assert plan_prefetch(100 * MB, 0.02, 8, 64 << 10, 4096, target_blocks=10_000).depth == 7  # at most L - 1
    assert plan_prefetch(100 * MB, 0.02, 8, 64 << 10, 4096, min_depth=4).depth == 4


def test_ring_follows_the_lease_below_the_transparent_limit_and_not_above_it():
    # A fast link: 3200 blocks could stream under the compute; demand needs 40.
    fast = plan_prefetch(100 * MB, 2.0, 8, 64 << 10, 4096, lease_blocks=40)
    assert fast == PrefetchPlan(1, 60)
    # A lease above the transparent limit gets no wider ring than the limit allows.
    assert plan_prefetch(100 * MB, 0.02, 8, 64 << 10, 4096, lease_blocks=400).num_staging_blocks == 48
    assert plan_prefetch(100 * MB, 0.02, 8, 64 << 10, 4096, lease_blocks=0).num_staging_blocks == 2


@pytest.mark.parametrize(
    "args",
    [(0.0, 0.02, 8, 1, 10), (1.0, 0.0, 8, 1, 10), (1.0, 1.0, 0, 1, 10), (1.0, 1.0, 8, 1, 0), (1.0, 1.0, 8, 0, 10)],
)
def test_bad_measurements_are_refused(args):
    with pytest.raises(ValueError):
        plan_prefetch(*args)


def _steps(planner: PrefetchPlanner, compute_time: float, count: int = 8) -> None:
    for _ in range(count):
        planner.observe(StepSample(step_time=compute_time, forward_time=compute_time, num_host_blocks=1))


def test_planner_commands_only_real_changes_and_widens_for_a_full_ring():
    planner = PrefetchPlanner(num_layers=8, block_bytes=64 << 10, capacity=1024)
    assert planner.current == PrefetchPlan(1, 1024)
    assert planner.decide(100 * MB, 0, 20) is None  # no step measured yet
    _steps(planner, 0.02)
    assert planner.decide(None, 0, 20) is None  # no bandwidth known yet
    _steps(planner, 0.02)
    first = planner.decide(100 * MB, 0, 20)  # 32 transparent, 20 wanted: 30
    assert first == PrefetchPlan(1, 30)
    _steps(planner, 0.02)
    assert planner.decide(100 * MB, 0, 22) is None  # within the hysteresis: the ring stays
    _steps(planner, 0.02)
    assert planner.decide(100 * MB, 0, 30).num_staging_blocks == 45  # the lease fills the ring: wider
    _steps(planner, 0.01)  # half the compute: the limit halves, and the ring with it
    assert planner.decide(100 * MB, 0, 30).num_staging_blocks == 24
    _steps(planner, 0.01)
    assert planner.decide(100 * MB, 0, 0).num_staging_blocks == 2  # released: the ring goes too


def test_pool_reshaped_for_a_new_ring_keeps_every_device_page_and_frees_the_rest():
    import torch

    from workers.executor.kv_pool import KVPool

    pool = KVPool(2, 3, 4, 1, 2, torch.float32, "cpu", num_extra_pages=12)
    pool.pages.copy_(torch.randn_like(pool.pages))
    device_pages = pool.pages[: pool.num_device_pages].clone()
    pool.resize_extra_pages(4)
    assert pool.pages.shape[0] == 6 + 4 and pool.num_extra_pages == 4
    assert torch.equal(pool.pages[:6], device_pages) and not pool.extra_pages.any()
    pool.resize_extra_pages(20)
    assert pool.pages.shape[0] == 26 and torch.equal(pool.pages[:6], device_pages)
    with pytest.raises(ValueError):
        pool.resize_extra_pages(-1)


def test_scheduler_plans_no_step_reading_more_host_blocks_than_the_ring():
    from test_scheduler import assert_pool_empty, make
    from test_scheduler_host import assert_matches_reference, plan_tables

    driver = make(num_blocks=2, block_size=4, kv_policy="pie", num_host_blocks=16)
    scheduler = driver.scheduler
    prompts = {f"r{i}": [i + 1] * 6 for i in range(4)}
    for request_id, prompt in prompts.items():
        driver.add(request_id, prompt, max_tokens=8, ignore_eos=True)
    for _ in range(3):
        driver.step()
    scheduler.set_host_step_limit(5)  # a narrower ring, commanded mid-run
    assert scheduler.host_lease == 5
    scheduler.set_host_lease(12)  # a lease granted before the command arrived is held to the ring
    assert scheduler.host_lease == 5
    narrowed = len(driver.plans)
    driver.run()
    for plan in driver.plans[narrowed:]:
        host_blocks = {block for table in plan_tables(plan).values() for block in table if block >= 2}
        assert len(host_blocks) <= 5
    assert_matches_reference(driver, prompts, 8)
    assert_pool_empty(driver)
    with pytest.raises(ValueError):
        scheduler.set_host_step_limit(-1)


def test_memory_manager_commands_a_ring_the_lease_fits_in(tiny_model_dir):
    import proto
    from proto.config import EngineConfig
    from workers.memory.manager import HostMemory

    config = EngineConfig(
        model=str(tiny_model_dir("llama")), dtype="float32", block_size=4, kv_policy="pie", host_kv_gib=0.002
    )
    memory = HostMemory(config.validate())
    capacity = memory.num_staging_blocks
    assert capacity == memory.max_host_blocks  # the plan's ring until a command
    num_layers = memory.layout.num_layers
    # A 4 MB/s link and 10 ms of compute: some 40 KB per step, far below the host budget.
    step = StepSample(step_time=0.01, forward_time=0.01, num_layers=num_layers, link_bandwidth=4e6)
    commands = []
    for _ in range(64):
        lease = memory.granted
        in_use = lease  # the scheduler fills what it gets
        demand = proto.DemandReport(3, 0, in_use, True, lease, host_blocks_high_water=in_use)
        change = memory.on_step(step, demand)
        if change is None:
            continue
        # The lease granted never exceeds the ring in force once both messages are applied.
        assert change.lease <= memory.num_staging_blocks
        if change.prefetch is not None:
            commands.append(change.prefetch)
            ring = change.prefetch.num_staging_blocks
            assert change.ring_first == (ring > (commands[-2].num_staging_blocks if len(commands) > 1 else capacity))
    assert commands, "no prefetch command"
    expected = plan_prefetch(4e6, 0.01, num_layers, memory.layout.block_bytes, capacity)
    assert commands[0].num_staging_blocks <= max(expected.num_staging_blocks, memory.granted) < capacity
    assert all(command.prefetch_depth >= 1 for command in commands)
    memory.close()
