"""The scheduler's host tier: pie placement (full blocks on host, tails on device), the host lease
and its shrinks, and swap-style preemption, all driven by the fake executor of test_scheduler, which
keeps one paged store for both tiers and runs each plan's swap_out, then swap_in, then forward."""

from __future__ import annotations

import time
from array import array

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_scheduler import (
    VOCAB,
    Driver,
    FinishReason,
    StepResult,
    assert_pool_empty,
    make,
    plan_rows,
    reference_output,
    request_params,
    request_strategy,
    run_workload,
)

from proto import StepPlan, pack_i32, unpack_i32
from proto.config import ConfigError, EngineConfig
from workers.scheduler.request import RequestStatus
from workers.scheduler.scheduler import Scheduler
from workers.scheduler.tiers import BlockTiers


def plan_tables(plan: StepPlan) -> dict[str, list[int]]:
    tables = {}
    offset = 0
    for request_id, num_blocks in zip(plan.request_ids, unpack_i32(plan.num_blocks).tolist()):
        tables[request_id] = unpack_i32(plan.block_tables)[offset : offset + num_blocks].tolist()
        offset += num_blocks
    return tables


def pairs(packed: bytes) -> list[tuple[int, int]]:
    return [tuple(pair) for pair in unpack_i32(packed).reshape(-1, 2).tolist()]


def assert_matches_reference(driver: Driver, prompts: dict[str, list[int]], max_tokens: int) -> None:
    """Outputs of requests run with ``ignore_eos=True`` equal what the model gives without a scheduler."""
    params = {"max_tokens": max_tokens, "ignore_eos": True}
    for request_id, prompt in prompts.items():
        reference = reference_output(prompt, params, max_model_len=64, pool_tokens=10**6)
        assert driver.outputs[request_id].token_ids == reference.token_ids, request_id


# ---------------------------------------------------------------- the copy rules of one plan


def test_the_host_blocks_a_swap_in_reads_stay_allocated_until_the_plan_is_made():
    tiers = BlockTiers(num_device_blocks=4, num_host_blocks=4, block_size=4, pooling=False)
    tiers.host.set_lease(4)
    table = array("i", tiers.device.allocate(2))
    assert tiers.swap_out(table, num_computed_tokens=8) and list(table) == [4, 5]
    swap_out, swap_in = tiers.take_copies()
    assert pairs(swap_out) == [(0, 4), (1, 5)] and swap_in == b""
    tiers.swap_in(table)
    assert tiers.host.num_used == 2  # a swap_out of this plan must not overwrite them
    swap_out, swap_in = tiers.take_copies()
    assert swap_out == b"" and pairs(swap_in) == [(4, 2), (5, 3)]
    assert tiers.host.num_used == 0 and list(table) == [2, 3]


def test_freeing_a_block_drops_the_pending_copies_into_it():
    tiers = BlockTiers(num_device_blocks=3, num_host_blocks=4, block_size=4, pooling=True)
    tiers.host.set_lease(4)
    table = array("i")
    tiers.allocate(table, 3, num_computed_tokens=0)
    tiers.allocate(table, 1, num_computed_tokens=12)  # device full: the complete tail 2 moves out
    assert list(table) == [0, 1, 3, 2]
    tiers.free(table)
    assert tiers.take_copies() == (b"", b"")

    moving = array("i", tiers.host.allocate(2))  # [3, 4]
    tiers.host.set_lease(1)
    assert tiers.move_below_lease(moving, 1, []) and moving[0] == 3 and moving[1] < 3
    assert tiers.host.num_used_above_lease == 1  # host 4 is still to be read by the swap_in
    tiers.free(moving)
    assert tiers.host.num_used == 0  # nobody reads host 4 any more: free at once
    assert tiers.take_copies() == (b"", b"")


def test_a_block_filled_by_a_swap_in_is_not_copied_out_by_the_same_plan():
    tiers = BlockTiers(num_device_blocks=1, num_host_blocks=4, block_size=4, pooling=True)
    tiers.host.set_lease(4)
    table = array("i", tiers.host.allocate(2))  # [1, 2]
    tiers.host.set_lease(1)
    assert tiers.move_below_lease(table, 1, []) and list(table) == [1, 0]
    tiers.host.set_lease(4)
    # Its complete tail 0 would move out to make room, but the swap_out would run before the swap_in
    # that fills it: the new tail goes to the host instead.
    tiers.allocate(table, 1, num_computed_tokens=8)
    assert list(table) == [1, 0, 3]
    swap_out, swap_in = tiers.take_copies()
    assert swap_out == b"" and pairs(swap_in) == [(2, 0)]


# ---------------------------------------------------------------- pie: placement


def test_pie_puts_full_blocks_on_host_and_keeps_the_tail_on_device():
    driver = make(num_blocks=4, block_size=4, kv_policy="pie", num_host_blocks=16)
    prompt = list(range(1, 23))  # 22 tokens: 6 blocks, 4 on the device
    driver.add("a", prompt, max_tokens=12, ignore_eos=True)
    first = driver.step()
    # The two first (full) blocks go to the host (ids 4, 5); the tail and the rest to the device.
    assert plan_tables(first)["a"] == [4, 5, 0, 1, 2, 3]
    previous = plan_tables(first)["a"]
    while driver.scheduler.has_unfinished():
        plan = driver.step()
        table = plan_tables(plan)["a"]
        assert table[-1] < 4, "the tail left the device"
        if plan_rows(plan)[0][1] % 4 == 0:  # the first token of a new block: the full tail moves out
            [(device_tail, host_id)] = pairs(plan.swap_out)
            assert device_tail == previous[-1] and host_id >= 4
            assert table == previous[:-1] + [host_id, device_tail]
        else:
            assert plan.swap_out == b"" and table == previous
        previous = table
    assert driver.scheduler.num_preemptions == 0
    assert_matches_reference(driver, {"a": prompt}, max_tokens=12)
    assert_pool_empty(driver)


def test_pie_gives_a_host_tail_back_to_the_device_when_blocks_free_up():
    driver = make(num_blocks=4, block_size=4, kv_policy="pie", num_host_blocks=16)
    driver.add("a", [1] * 15, max_tokens=1, ignore_eos=True)  # fills the device
    driver.add("b", [2] * 6, max_tokens=10, ignore_eos=True)  # all on the host: nothing else free
    assert plan_tables(driver.step()) == {"a": [0, 1, 2, 3], "b": [4, 5]}
    plan = driver.step()  # a finished: b's tail comes back, its full block stays on the host
    assert pairs(plan.swap_in) == [(5, 3)] and plan_tables(plan)["b"] == [4, 3]
    assert driver.scheduler.num_tail_promotions == 1
    driver.run()
    assert all(plan_tables(plan)["b"][-1] < 4 for plan in driver.plans[1:])
    assert_matches_reference(driver, {"b": [2] * 6}, max_tokens=10)
    assert_pool_empty(driver)


def test_pie_admits_more_requests_than_the_device_alone_at_the_same_pool():
    prompts = {f"r{i}": [i + 1] * 10 for i in range(8)}  # up to 5 blocks each
    concurrency = {}
    drivers = {}
    for policy, num_host_blocks in (("none", 0), ("pie", 32)):
        driver = make(
            num_blocks=8, block_size=4, max_num_seqs=16, kv_policy=policy, num_host_blocks=num_host_blocks
        )
        for request_id, prompt in prompts.items():
            driver.add(request_id, prompt, max_tokens=8, ignore_eos=True)
        peak = 0
        while driver.scheduler.has_unfinished():
            driver.step()
            peak = max(peak, driver.scheduler.num_running)
        concurrency[policy] = peak
        drivers[policy] = driver
        assert_pool_empty(driver)
    assert concurrency["none"] <= 2 and concurrency["pie"] == 8
    assert drivers["pie"].scheduler.num_preemptions == 0 < drivers["none"].scheduler.num_preemptions
    assert drivers["pie"].executor.max_host_blocks_per_step > 0
    for request_id in prompts:
        assert drivers["none"].outputs[request_id].token_ids == drivers["pie"].outputs[request_id].token_ids


# ---------------------------------------------------------------- the lease


def test_a_lease_shrink_moves_host_blocks_to_free_device_blocks():
    driver = make(num_blocks=8, block_size=4, kv_policy="pie", num_host_blocks=8)
    scheduler = driver.scheduler
    driver.add("a", [1] * 12, max_tokens=1, ignore_eos=True)
    driver.add("b", [2] * 24, max_tokens=6, ignore_eos=True)
    assert plan_tables(driver.step())["b"][0] == 8  # b's first block went to the host
    scheduler.set_host_lease(0)
    assert scheduler.host_blocks_above_lease == 1 and scheduler.host_release_step_id == 0
    plan = driver.step()  # a finished and freed 3 device blocks: b's host block moves into one
    [(source, destination)] = pairs(plan.swap_in)
    assert source == 8 and destination < 8 and plan_tables(plan)["b"][0] == destination
    assert scheduler.host_blocks_above_lease == 0 and scheduler.host_release_step_id == plan.step_id
    assert scheduler.num_recomputes == 0
    driver.run()
    assert_matches_reference(driver, {"b": [2] * 24}, max_tokens=6)
    assert_pool_empty(driver)


def test_a_lease_shrink_bounces_through_a_device_block_to_a_free_host_block_below_the_lease():
    driver = make(num_blocks=4, block_size=4, kv_policy="pie", num_host_blocks=4)
    scheduler = driver.scheduler
    driver.add("r1", [1] * 16, max_tokens=6, ignore_eos=True)  # the whole device
    driver.add("r2", [2] * 7, max_tokens=1, ignore_eos=True)  # host 4, 5; finishes at once
    driver.add("r3", [3] * 3, max_tokens=6, ignore_eos=True)  # host 6
    assert plan_tables(driver.step()) == {"r1": [0, 1, 2, 3], "r2": [4, 5], "r3": [6]}
    scheduler.set_host_lease(2)  # host 6 is above; 4 and 5 are free below
    plan = driver.step()
    # r1's full block 0 moves to host 4 and frees device 0 for r3's block (swap_out runs first);
    # r1's complete tail 3 moves to host 5 so that 3 can be its new tail.
    assert pairs(plan.swap_out) == [(0, 4), (3, 5)] and pairs(plan.swap_in) == [(6, 0)]
    assert plan_tables(plan) == {"r1": [4, 1, 2, 5, 3], "r3": [0]}
    assert scheduler.num_recomputes == 0 and scheduler.host_blocks_above_lease == 0
    driver.run()
    assert_matches_reference(driver, {"r1": [1] * 16, "r3": [3] * 3}, max_tokens=6)
    assert_pool_empty(driver)


def test_a_lease_shrink_preempts_when_no_block_can_move():
    driver = make(num_blocks=4, block_size=4, kv_policy="pie", num_host_blocks=8)
    scheduler = driver.scheduler
    driver.add("a", [1] * 8, max_tokens=4, ignore_eos=True)
    driver.add("b", [2] * 12, max_tokens=4, ignore_eos=True)
    assert plan_tables(driver.step()) == {"a": [0, 1], "b": [4, 2, 3]}
    scheduler.set_host_lease(0)  # no free device block and no host room: b recomputes
    plan = driver.step()
    assert plan.request_ids == ["a"] and scheduler.num_recomputes == 1
    assert scheduler.requests["b"].status == RequestStatus.WAITING
    assert scheduler.num_host_blocks_used == 0
    driver.run()
    assert_matches_reference(driver, {"a": [1] * 8, "b": [2] * 12}, max_tokens=4)
    assert_pool_empty(driver)


def test_host_blocks_stay_inside_the_lease_and_the_lease_inside_the_pool():
    driver = make(num_blocks=2, block_size=4, kv_policy="pie", num_host_blocks=8, host_lease=3)
    scheduler = driver.scheduler
    for i in range(4):
        driver.add(f"r{i}", [i + 1] * 6, max_tokens=8, ignore_eos=True)
    driver.run()  # check_plan_against_tiers: no plan uses a host block at or above the lease
    assert driver.executor.max_host_blocks_per_step == 3
    assert_pool_empty(driver)
    with pytest.raises(ValueError, match="host lease"):
        scheduler.set_host_lease(9)


def test_demand_says_when_the_scheduler_is_short_of_blocks():
    driver = make(num_blocks=2, block_size=4, kv_policy="pie", num_host_blocks=8, host_lease=0)
    scheduler = driver.scheduler
    driver.add("a", [1] * 16, max_tokens=2, ignore_eos=True)  # 4 blocks, the device has 2
    assert driver.step() is None
    demand = scheduler.demand
    assert demand.short_of_blocks and demand.num_blocks_short == 2 and demand.num_waiting == 1
    scheduler.set_host_lease(3)  # 5 blocks with its second token
    driver.run()
    assert not scheduler.demand.short_of_blocks and scheduler.demand.num_waiting == 0
    assert_pool_empty(driver)


def test_policy_none_takes_no_host_blocks():
    with pytest.raises(ConfigError, match="no host blocks"):
        Scheduler(EngineConfig(kv_policy="none"), 16, {0}, 64, num_host_blocks=4)


# ---------------------------------------------------------------- swap


def swap_driver(host_lease: int | None = None) -> Driver:
    driver = make(
        num_blocks=6,
        block_size=4,
        max_model_len=24,
        kv_policy="swap",
        num_host_blocks=32,
        host_lease=host_lease,
    )
    driver.add("a", [1] * 8, max_tokens=14, ignore_eos=True)
    driver.add("b", [2] * 8, max_tokens=14, ignore_eos=True)
    return driver


def test_swap_moves_a_preempted_request_to_host_and_back_without_recompute():
    driver = swap_driver()
    driver.run()
    scheduler = driver.scheduler
    assert scheduler.num_preemptions > 0 and scheduler.num_swap_outs == scheduler.num_preemptions
    assert scheduler.num_recomputes == 0 and scheduler.num_swap_ins == scheduler.num_swap_outs
    swap_outs = [plan for plan in driver.plans if plan.swap_out]
    swap_ins = [plan for plan in driver.plans if plan.swap_in]
    assert swap_outs and swap_ins
    # The device blocks a swap-out frees are reused by the same plan (the executor copies them first).
    assert any(
        {source for source, _ in pairs(plan.swap_out)} & set(unpack_i32(plan.block_tables).tolist())
        for plan in swap_outs
    )
    # Nothing restarts from position 0: b continues where it was swapped out.
    for request_id in ("a", "b"):
        starts = [row[1] for plan in driver.plans for row in plan_rows(plan) if row[0] == request_id]
        assert starts == sorted(starts) and starts.count(0) == 1
    assert_matches_reference(driver, {"a": [1] * 8, "b": [2] * 8}, max_tokens=14)
    assert_pool_empty(driver)


def test_swap_falls_back_to_recompute_when_the_lease_has_no_room():
    driver = swap_driver(host_lease=1)
    driver.run()
    scheduler = driver.scheduler
    assert scheduler.num_swap_outs == 0 and scheduler.num_recomputes == scheduler.num_preemptions > 0
    assert all(not plan.swap_out and not plan.swap_in for plan in driver.plans)
    assert_matches_reference(driver, {"a": [1] * 8, "b": [2] * 8}, max_tokens=14)
    assert_pool_empty(driver)


def test_a_swapped_request_resumes_before_later_arrivals():
    driver = swap_driver()
    driver.step()
    driver.add("c", [3] * 8, max_tokens=2, ignore_eos=True)
    while driver.scheduler.num_swap_outs == 0:
        driver.step()
    assert [request.request_id for request in driver.scheduler.swapped] == ["b"]
    while not driver.step().swap_in:
        pass
    # c waited behind the swapped b, and comes (at the earliest) right after it.
    assert all("c" not in plan.request_ids for plan in driver.plans[:-1])
    rows = [row[0] for row in plan_rows(driver.plans[-1])]
    assert rows.index("b") < rows.index("c") if "c" in rows else "b" in rows
    driver.run()
    assert_pool_empty(driver)


def test_a_lease_shrink_makes_swapped_requests_recompute():
    driver = swap_driver()
    scheduler = driver.scheduler
    while scheduler.num_swapped == 0:
        driver.step()
    scheduler.set_host_lease(0)
    assert scheduler.host_blocks_above_lease > 0
    driver.step()
    assert scheduler.host_blocks_above_lease == 0 and scheduler.num_recomputes == 1
    assert scheduler.requests["b"].status != RequestStatus.SWAPPED
    driver.run()
    assert_matches_reference(driver, {"a": [1] * 8, "b": [2] * 8}, max_tokens=14)
    assert_pool_empty(driver)


def test_aborts_free_host_blocks():
    driver = swap_driver()
    while driver.scheduler.num_swapped == 0:
        driver.step()
    assert driver.scheduler.num_host_blocks_used > 0
    driver.collect(driver.scheduler.abort_requests(["b"]))
    assert driver.outputs["b"].finish_reason == FinishReason.ABORT
    assert driver.scheduler.num_host_blocks_used == 0
    driver.run()
    assert_pool_empty(driver)

    driver = make(num_blocks=4, block_size=4, kv_policy="pie", num_host_blocks=16)
    driver.add("a", [1] * 22, max_tokens=12, ignore_eos=True)
    driver.step()
    driver.step(mid_step=lambda: driver.collect(driver.scheduler.abort_requests(["a"])))
    assert_pool_empty(driver)


# ---------------------------------------------------------------- random workloads


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_strategy, min_size=2, max_size=10),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(2, 6),
    budget=st.integers(1, 48),
    enable_chunked_prefill=st.booleans(),
    spare_blocks=st.integers(-2, 1),
    plenty_of_host=st.booleans(),
    few_host_blocks=st.integers(1, 12),
    lease_changes=st.lists(st.tuples(st.integers(0, 40), st.floats(0, 1)), max_size=4),
    prefix_caching=st.booleans(),
)
def test_outputs_do_not_depend_on_the_kv_policy(
    requests,
    block_size,
    max_num_seqs,
    budget,
    enable_chunked_prefill,
    spare_blocks,
    plenty_of_host,
    few_host_blocks,
    lease_changes,
    prefix_caching,
):
    max_model_len = 48
    requests = [dict(request, prompt=request["prompt"][: max_model_len - 1]) for request in requests]
    peak = max(
        min(len(r["prompt"]) + (r["max_tokens"] or max_model_len), max_model_len) - 1 for r in requests
    )
    # A tiny device (about one request's worth) so that every policy is under pressure all the time.
    num_device_blocks = max(1, -(-peak // block_size) + spare_blocks)
    plenty = len(requests) * -(-max_model_len // block_size)
    num_host_blocks = plenty if plenty_of_host else few_host_blocks
    host_leases = {step: round(fraction * num_host_blocks) for step, fraction in lease_changes}
    config = dict(
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget if enable_chunked_prefill else max_model_len,
        enable_chunked_prefill=enable_chunked_prefill,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix_caching,
    )
    runs = {
        "none": run_workload(requests, config, num_device_blocks),
        **{
            policy: run_workload(
                requests,
                dict(config, kv_policy=policy, num_host_blocks=num_host_blocks),
                num_device_blocks,
                host_leases,
            )
            for policy in ("swap", "pie")
        },
    }
    for policy, driver in runs.items():
        pool_tokens = driver.scheduler.max_pool_tokens
        for i, request in enumerate(requests):
            reference = reference_output(
                request["prompt"], request_params(request), max_model_len, pool_tokens
            )
            out = driver.outputs[f"r{i}"]
            if out.finish_reason == FinishReason.ABORT:
                assert request["abort_step"] is not None
                assert out.token_ids == reference.token_ids[: len(out.token_ids)]
            else:
                assert (out.token_ids, out.finish_reason, out.stop_token_id) == (
                    reference.token_ids,
                    reference.finish_reason,
                    reference.stop_token_id,
                ), policy
        assert_pool_empty(driver)
        assert driver.executor.max_host_blocks_per_step <= driver.scheduler.num_host_blocks
    swap, pie = runs["swap"].scheduler, runs["pie"].scheduler
    if plenty_of_host and not host_leases:
        assert swap.num_recomputes == 0, "swap recomputed although the host had room"
    event(f"swap swapped: {swap.num_swap_outs > 0}; recomputed: {swap.num_recomputes > 0}")
    event(f"pie used the host: {runs['pie'].executor.max_host_blocks_per_step > 0}")
    event(f"pie recomputed: {pie.num_recomputes > 0}")
    event(f"pie moved a tail out: {any(plan.swap_out for plan in runs['pie'].plans)}")
    event(f"pie moved blocks in: {any(plan.swap_in for plan in runs['pie'].plans)}")
    for i in range(len(requests)):
        outs = [driver.outputs[f"r{i}"] for driver in runs.values()]
        if not {out.finish_reason for out in outs} & {FinishReason.ABORT, FinishReason.ERROR}:
            assert all(out.token_ids == outs[0].token_ids for out in outs)


# ---------------------------------------------------------------- speed (printed, not asserted)


def test_pie_decode_step_overhead_at_batch_256(capsys):
    # The prompts need twice the device: the first half of the batch fills it, the rest lives on the
    # host, and decodes at a block boundary either move their full device tail out or take a host block.
    driver = make(
        num_blocks=256 * 16,
        block_size=16,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        max_model_len=4096,
        kv_policy="pie",
        num_host_blocks=256 * 48,
    )
    scheduler = driver.scheduler
    for i in range(256):
        driver.add(f"r{i}", [i % VOCAB] * 512, max_tokens=1000, ignore_eos=True)
    while any(
        request.num_computed_tokens < request.num_prompt_tokens for request in scheduler.requests.values()
    ):
        driver.step()
    assert scheduler.block_manager.num_free == 0 and scheduler.num_host_blocks_used >= 256 * 16
    sampled = pack_i32(np.arange(256) % VOCAB)
    num_steps = 200
    elapsed = 0.0
    num_tail_moves = 0
    for _ in range(num_steps):
        start = time.perf_counter()
        plan = scheduler.schedule()
        result = StepResult(step_id=plan.step_id, sampled_token_ids=sampled)
        deltas = scheduler.postprocess(plan, result)
        elapsed += time.perf_counter() - start
        assert len(plan.request_ids) == len(deltas) == 256
        num_tail_moves += len(plan.swap_out) // 8
    assert num_tail_moves > 0 and scheduler.num_preemptions == 0
    with capsys.disabled():
        print(
            f"\npie schedule+postprocess at batch 256 decode ({scheduler.num_host_blocks_used} host blocks, "
            f"{num_tail_moves} tail moves): {elapsed / num_steps * 1e3:.3f} ms/step"
        )
