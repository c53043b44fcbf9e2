"""Prefix caching across the device and host tiers.

First with the scheduler and the fake executor of test_scheduler (a 'model' whose next token hashes
the whole context it reads back through the block tables, so a wrong hit, a shared block written, or a
demotion/promotion copy in the wrong order changes the output); then end to end through the engine
(its actors as threads) with real tiny models, where greedy tokens must be the same with caching on
and off.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from engine_driver import assert_all_free, assert_tokens_match, drive, greedy, running_engine
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_scheduler import (
    VOCAB,
    Driver,
    FinishReason,
    assert_pool_empty,
    make,
    plan_rows,
    reference_output,
    request_params,
    run_workload,
)
from test_scheduler_host import pairs, plan_tables
from tiny_models import build_model_dir

import proto
from pied.cli import build_parser, engine_config_from_args
from pied.engine import Engine
from pied.metrics import ServerMetrics
from proto.config import EngineConfig
from workers.scheduler import prefix_cache
from workers.scheduler.prefix_cache import PrefixCache, hash_block

BLOCK_SIZE = 4


def prefilled(driver: Driver, request_id: str) -> list[tuple[int, int]]:
    """(start position, number of tokens) of every step that scheduled ``request_id``."""
    return [
        (start, num) for plan in driver.plans for rid, start, num, _ in plan_rows(plan) if rid == request_id
    ]


def num_prefilled(driver: Driver, request_id: str, num_prompt_tokens: int) -> int:
    """Prompt tokens a request computed (its decode steps excluded)."""
    return sum(min(num, max(0, num_prompt_tokens - start)) for start, num in prefilled(driver, request_id))


def run_one(driver: Driver, request_id: str, prompt: list[int], max_tokens: int = 3) -> None:
    driver.add(request_id, prompt, max_tokens=max_tokens, ignore_eos=True)
    driver.run()


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    params = {"max_tokens": max_tokens, "ignore_eos": True}
    return reference_output(prompt, params, max_model_len=64, pool_tokens=10**6).token_ids


def assert_idle_and_clean(driver: Driver) -> None:
    """Nothing referenced, every block free (empty or cached) and every cached block free."""
    assert_pool_empty(driver)
    tiers = driver.scheduler.tiers
    cache = driver.scheduler.prefix_cache
    assert cache is not None
    device, host = tiers.device, tiers.host
    assert device.num_cached_free + host.num_cached_free == len(cache)
    assert not tiers.take_copies()[1], "a swap_in left pending while idle"


# ---------------------------------------------------------------- hashing


def test_block_names_chain_over_the_prefix_and_are_stable():
    a = hash_block(b"", proto.pack_i32([1, 2, 3, 4]))
    assert a == hash_block(b"", proto.pack_i32([1, 2, 3, 4])) and len(a) == 16
    assert hash_block(a, proto.pack_i32([5, 6, 7, 8])) != hash_block(b"", proto.pack_i32([5, 6, 7, 8]))
    # The same block after a different prefix has a different name.
    b = hash_block(b"", proto.pack_i32([1, 2, 3, 9]))
    assert hash_block(a, proto.pack_i32([5, 6, 7, 8])) != hash_block(b, proto.pack_i32([5, 6, 7, 8]))


def test_a_hash_collision_is_caught_by_the_stored_tokens():
    cache = PrefixCache()
    assert cache.insert(7, b"name", b"key-a")
    assert cache.lookup(b"name", b"key-a") == 7
    assert cache.lookup(b"name", b"key-b") is None  # same name, other content: a miss
    assert not cache.insert(8, b"name", b"key-b")  # the name is taken: block 8 stays private
    cache.move(7, 12)
    assert cache.lookup(b"name", b"key-a") == 12 and 7 not in cache and 12 in cache
    cache.remove(12)
    assert len(cache) == 0 and cache.stats.num_evictions == 1


def test_every_block_colliding_gives_no_wrong_hit(monkeypatch):
    # Every block has the same name: only the stored parent and tokens tell them apart.
    monkeypatch.setattr(prefix_cache, "hash_block", lambda parent, tokens: b"same")
    driver = make(num_blocks=32, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7, 8, 9], "b": [1, 2, 3, 4, 6, 6, 7, 8, 9], "c": [1, 2, 3, 4, 5, 6]}
    for request_id, prompt in prompts.items():
        run_one(driver, request_id, prompt)
        assert driver.outputs[request_id].token_ids == expected(prompt, 3), request_id
    assert driver.scheduler.prefix_cache_stats.num_device_hit_tokens == 4 + 4  # b and c: a's first block
    assert_idle_and_clean(driver)


# ---------------------------------------------------------------- hits (device tier)


@pytest.mark.parametrize(
    "prompt_len, num_hit_tokens",
    [(10, 8), (12, 8), (13, 12), (4, 0), (3, 0)],  # mid-block; on a boundary: the last block recomputes
)
def test_a_repeated_prompt_computes_only_its_last_partial_block(prompt_len, num_hit_tokens):
    driver = make(num_blocks=32, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    prompt = [(7 * i) % VOCAB for i in range(prompt_len)]
    run_one(driver, "first", prompt, max_tokens=5)
    run_one(driver, "second", prompt, max_tokens=5)
    assert prefilled(driver, "second")[0] == (num_hit_tokens, prompt_len - num_hit_tokens)
    assert num_prefilled(driver, "second", prompt_len) == prompt_len - num_hit_tokens
    assert driver.outputs["second"].token_ids == driver.outputs["first"].token_ids == expected(prompt, 5)
    assert all(delta.num_cached_tokens == num_hit_tokens for delta in driver.outputs["second"].deltas)
    assert all(delta.num_cached_tokens == 0 for delta in driver.outputs["first"].deltas)
    stats = driver.scheduler.prefix_cache_stats
    assert stats.num_query_tokens == 2 * prompt_len
    assert stats.num_device_hit_tokens == num_hit_tokens and stats.num_host_hit_tokens == 0
    assert_idle_and_clean(driver)


def test_concurrent_requests_share_prefix_blocks_by_reference():
    driver = make(num_blocks=32, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    system = list(range(1, 13))  # three full blocks
    run_one(driver, "warm", system + [40], max_tokens=1)
    driver.add("a", system + [41, 42], max_tokens=6, ignore_eos=True)
    driver.add("b", system + [43], max_tokens=6, ignore_eos=True)
    plan = driver.step()
    tables = plan_tables(plan)
    assert tables["a"][:3] == tables["b"][:3] == plan_tables(driver.plans[0])["warm"][:3]
    assert tables["a"][3] != tables["b"][3]  # each appends into its own tail block
    assert all(driver.scheduler.block_manager.ref_count(block_id) == 2 for block_id in tables["a"][:3])
    assert [row[1:3] for row in plan_rows(plan)] == [(12, 2), (12, 1)]
    driver.run()
    for request_id, prompt in {"a": system + [41, 42], "b": system + [43]}.items():
        assert driver.outputs[request_id].token_ids == expected(prompt, 6)
    assert_idle_and_clean(driver)


def test_a_sequence_shares_its_generated_blocks_too():
    # A follow-up turn sends the previous prompt and answer back: both are cached.
    driver = make(num_blocks=32, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(1, 7))
    run_one(driver, "turn1", prompt, max_tokens=7)
    follow_up = prompt + driver.outputs["turn1"].token_ids + [9, 9, 9]
    run_one(driver, "turn2", follow_up, max_tokens=3)
    # 6 + 7 = 13 tokens: the answer's last token was sampled, never computed; 3 blocks are cached.
    assert prefilled(driver, "turn2")[0] == (12, len(follow_up) - 12)
    assert driver.outputs["turn2"].token_ids == expected(follow_up, 3)
    assert_idle_and_clean(driver)


def test_usage_counts_only_referenced_blocks_and_returns_to_zero_when_idle():
    driver = make(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    scheduler = driver.scheduler
    driver.add("a", list(range(1, 30)), max_tokens=3, ignore_eos=True)
    driver.step()
    assert scheduler.usage == 8 / 16
    driver.run()
    assert scheduler.usage == 0.0 and scheduler.block_manager.num_free == 16
    assert scheduler.block_manager.num_cached_free == 7  # 31 computed tokens: 7 full blocks
    assert_idle_and_clean(driver)


def test_eviction_takes_empty_blocks_first_then_the_least_recently_freed_tail_first():
    driver = make(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    scheduler = driver.scheduler
    run_one(driver, "a", list(range(1, 10)), max_tokens=1)  # 2 full blocks cached, 1 partial
    run_one(driver, "b", list(range(20, 29)), max_tokens=1)
    a_blocks = plan_tables(driver.plans[0])["a"]
    b_blocks = plan_tables(driver.plans[1])["b"]
    assert scheduler.block_manager.num_cached_free == 4
    # 4 empty blocks and 4 cached ones are free: a 7-block request takes the empty ones, then evicts
    # a's blocks before b's, each sequence's tail before its prefix.
    run_one(driver, "c", list(range(30, 55)), max_tokens=1)
    c_blocks = plan_tables(driver.plans[2])["c"]
    assert c_blocks[4:] == [a_blocks[1], a_blocks[0], b_blocks[1]]
    run_one(driver, "b2", list(range(20, 29)), max_tokens=1)
    run_one(driver, "a2", list(range(1, 10)), max_tokens=1)
    assert prefilled(driver, "b2")[0][0] == 4  # its first block survived
    assert prefilled(driver, "a2")[0][0] == 0  # evicted
    assert_idle_and_clean(driver)


def test_a_preempted_request_finds_its_own_blocks_again():
    driver = make(num_blocks=6, block_size=BLOCK_SIZE, max_model_len=24, enable_prefix_caching=True)
    driver.add("a", [1] * 8, max_tokens=10, ignore_eos=True)
    driver.add("b", [2] * 8, max_tokens=14, ignore_eos=True)
    driver.run()
    assert driver.scheduler.num_recomputes > 0
    # a took only the tail blocks of b's freed cache: b resumes after its first cached blocks.
    restarts = [start for start, num in prefilled(driver, "b")[1:] if num > 1]
    assert restarts and all(start > 0 for start in restarts), prefilled(driver, "b")
    for request_id, prompt, max_tokens in (("a", [1] * 8, 10), ("b", [2] * 8, 14)):
        assert driver.outputs[request_id].token_ids == expected(prompt, max_tokens)
    assert_idle_and_clean(driver)


def test_aborting_one_sharer_keeps_the_shared_blocks_for_the_other():
    driver = make(num_blocks=32, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    system = list(range(1, 9))
    run_one(driver, "warm", system + [30], max_tokens=1)
    driver.add("a", system + [31], max_tokens=8, ignore_eos=True)
    driver.add("b", system + [32], max_tokens=8, ignore_eos=True)
    driver.step()
    driver.step(mid_step=lambda: driver.collect(driver.scheduler.abort_requests(["a"])))
    assert driver.outputs["a"].finish_reason == FinishReason.ABORT
    driver.run()
    assert driver.outputs["b"].token_ids == expected(system + [32], 8)
    assert_idle_and_clean(driver)


# ---------------------------------------------------------------- the host tier


def evict_to_host(driver: Driver, prompt: list[int], filler_prompts: list[list[int]]) -> None:
    """Run ``prompt`` once, then enough other traffic to push its cached blocks off the device."""
    run_one(driver, "original", prompt, max_tokens=2)
    for index, filler in enumerate(filler_prompts):
        run_one(driver, f"filler{index}", filler, max_tokens=2)


FILLERS = [[40 + i] * 15 for i in range(3)]


def test_pie_demotes_evicted_blocks_to_host_and_streams_a_later_hit_from_there():
    driver = make(
        num_blocks=5, block_size=BLOCK_SIZE, kv_policy="pie", num_host_blocks=16, enable_prefix_caching=True
    )
    scheduler = driver.scheduler
    prompt = list(range(1, 14))  # 3 full blocks + 1
    evict_to_host(driver, prompt, FILLERS)
    stats = scheduler.prefix_cache_stats
    assert stats.num_demotions >= 3
    demoted = [pair for plan in driver.plans for pair in pairs(plan.swap_out)]
    assert demoted and all(device_id < 5 <= host_id for device_id, host_id in demoted)
    run_one(driver, "again", prompt, max_tokens=4)
    assert prefilled(driver, "again")[0] == (12, 1)
    assert stats.num_host_hit_tokens == 12
    table = plan_tables(next(plan for plan in driver.plans if "again" in plan.request_ids))["again"]
    assert all(block_id >= 5 for block_id in table[:3]) and table[-1] < 5  # streamed; tail on device
    assert driver.outputs["again"].token_ids == expected(prompt, 4)
    assert_idle_and_clean(driver)


def test_pie_promotes_a_host_hit_when_the_device_has_room():
    driver = make(
        num_blocks=5, block_size=BLOCK_SIZE, kv_policy="pie", num_host_blocks=16, enable_prefix_caching=True
    )
    prompt = list(range(1, 10))  # 2 full blocks + 1
    evict_to_host(driver, prompt, FILLERS)
    # Forget what the device caches (the fillers' blocks), so that it has empty blocks to promote into.
    device = driver.scheduler.tiers.device
    for block_id in range(5):
        if device.is_cached(block_id):
            driver.scheduler.prefix_cache.remove(block_id)
            device.unmark_cached(block_id)
    run_one(driver, "again", prompt, max_tokens=3)
    plan = next(plan for plan in driver.plans if "again" in plan.request_ids)
    assert len(pairs(plan.swap_in)) == 2 and all(block_id < 5 for block_id in plan_tables(plan)["again"])
    assert driver.scheduler.prefix_cache_stats.num_promotions == 2
    assert driver.outputs["again"].token_ids == expected(prompt, 3)
    assert_idle_and_clean(driver)


def test_swap_policy_demotes_and_promotes_through_swap_in():
    driver = make(
        num_blocks=5, block_size=BLOCK_SIZE, kv_policy="swap", num_host_blocks=16, enable_prefix_caching=True
    )
    prompt = list(range(1, 14))
    evict_to_host(driver, prompt, FILLERS)
    run_one(driver, "again", prompt, max_tokens=4)
    plan = next(plan for plan in driver.plans if "again" in plan.request_ids)
    assert len(pairs(plan.swap_in)) == 3  # running requests hold device blocks only
    assert driver.scheduler.prefix_cache_stats.num_host_hit_tokens == 12
    assert driver.outputs["again"].token_ids == expected(prompt, 4)
    assert_idle_and_clean(driver)


def test_a_lease_shrink_forgets_the_host_cache_above_it():
    driver = make(
        num_blocks=5, block_size=BLOCK_SIZE, kv_policy="pie", num_host_blocks=16, enable_prefix_caching=True
    )
    scheduler = driver.scheduler
    prompt = list(range(1, 14))
    evict_to_host(driver, prompt, FILLERS)
    assert scheduler.tiers.host.num_cached_free > 0
    scheduler.set_host_lease(0)
    assert scheduler.tiers.host.num_cached_free == 0
    assert len(scheduler.prefix_cache) == scheduler.block_manager.num_cached_free
    scheduler.set_host_lease(16)
    run_one(driver, "again", prompt, max_tokens=4)
    assert scheduler.prefix_cache_stats.num_host_hit_tokens == 0
    assert driver.outputs["again"].token_ids == expected(prompt, 4)
    assert_idle_and_clean(driver)


def test_no_demotion_without_room_on_the_host():
    driver = make(
        num_blocks=5,
        block_size=BLOCK_SIZE,
        kv_policy="pie",
        num_host_blocks=16,
        host_lease=0,
        enable_prefix_caching=True,
    )
    evict_to_host(driver, list(range(1, 14)), FILLERS)
    assert driver.scheduler.prefix_cache_stats.num_demotions == 0
    assert all(not plan.swap_out for plan in driver.plans)
    assert_idle_and_clean(driver)


# ---------------------------------------------------------------- random workloads


@st.composite
def shared_prefix_workloads(draw):
    """Requests whose prompts are one of a few shared prefixes plus a short own suffix, arriving over
    time, some aborted, so that hits, evictions, demotions and preemptions all meet."""
    prefixes = draw(
        st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=20), min_size=1, max_size=3)
    )
    requests = []
    for _ in range(draw(st.integers(2, 10))):
        prefix = draw(st.sampled_from(prefixes))
        suffix = draw(st.lists(st.integers(0, VOCAB - 1), min_size=0 if prefix else 1, max_size=6))
        requests.append(
            {
                "prompt": (prefix + suffix)[:40],
                "max_tokens": draw(st.integers(1, 12)),
                "min_tokens": 0,
                "ignore_eos": draw(st.booleans()),
                "stop_token_ids": [],
                "arrival_step": draw(st.integers(0, 30)),
                "abort_step": draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 40))),
                "abort_mid_step": draw(st.booleans()),
            }
        )
    return requests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=shared_prefix_workloads(),
    policy=st.sampled_from(["none", "swap", "pie"]),
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 48),
    enable_chunked_prefill=st.booleans(),
    num_device_blocks=st.integers(4, 40),
    num_host_blocks=st.integers(1, 40),
    lease_changes=st.lists(st.tuples(st.integers(0, 40), st.floats(0, 1)), max_size=3),
)
def test_outputs_with_prefix_caching_equal_the_reference(
    requests,
    policy,
    block_size,
    max_num_seqs,
    budget,
    enable_chunked_prefill,
    num_device_blocks,
    num_host_blocks,
    lease_changes,
):
    max_model_len = 48
    config = dict(
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget if enable_chunked_prefill else max_model_len,
        enable_chunked_prefill=enable_chunked_prefill,
        max_model_len=max_model_len,
        enable_prefix_caching=True,
    )
    host_leases = {}
    if policy != "none":
        config.update(kv_policy=policy, num_host_blocks=num_host_blocks)
        host_leases = {step: round(fraction * num_host_blocks) for step, fraction in lease_changes}
    driver = run_workload(requests, config, num_device_blocks, host_leases)
    pool_tokens = driver.scheduler.max_pool_tokens
    for i, request in enumerate(requests):
        reference = reference_output(request["prompt"], request_params(request), max_model_len, pool_tokens)
        out = driver.outputs[f"r{i}"]
        if out.finish_reason == FinishReason.ABORT:
            assert out.token_ids == reference.token_ids[: len(out.token_ids)]
        else:
            assert (out.token_ids, out.finish_reason) == (reference.token_ids, reference.finish_reason)
    assert_idle_and_clean(driver)
    stats = driver.scheduler.prefix_cache_stats
    event(f"hits: device {stats.num_device_hit_tokens > 0}, host {stats.num_host_hit_tokens > 0}")
    event(f"demoted: {stats.num_demotions > 0}; promoted: {stats.num_promotions > 0}")


# ---------------------------------------------------------------- configuration and metrics


def test_prefix_caching_is_on_by_default_and_has_a_flag_pair():
    assert EngineConfig().enable_prefix_caching
    parser = build_parser()
    args = parser.parse_args(["generate", "--no-enable-prefix-caching"])
    assert not engine_config_from_args(args).enable_prefix_caching
    driver = make(num_blocks=16, enable_prefix_caching=False)
    assert driver.scheduler.prefix_cache is None
    run_one(driver, "a", list(range(1, 10)))
    run_one(driver, "b", list(range(1, 10)))
    assert prefilled(driver, "b")[0] == (0, 9) and driver.scheduler.prefix_cache_stats.num_query_tokens == 0


def test_metrics_expose_queries_and_hits_per_tier():
    text = ServerMetrics("m").render(
        proto.Stats(
            prefix_cache_queries_total=40, prefix_cache_device_hits_total=16, prefix_cache_host_hits_total=8
        )
    )
    assert "# TYPE pied:prefix_cache_queries_total counter" in text
    assert 'pied:prefix_cache_queries_total{model_name="m"} 40.0' in text
    assert "# TYPE pied:prefix_cache_hits_total counter" in text
    # Hits on either tier (vLLM's hit rate is hits over queries); the host's part on its own series.
    assert 'pied:prefix_cache_hits_total{model_name="m"} 24.0' in text
    assert 'pied:host_prefix_cache_hits_total{model_name="m"} 8.0' in text


# ---------------------------------------------------------------- end to end with real tiny models


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp(f"prefix-{request.param}"), request.param)


class PlanLog:
    """Records the plans an engine runs (wrapping its executor's runner, a thread of this process),
    to count what each request prefilled."""

    def __init__(self, engine: Engine) -> None:
        self.plans: list[proto.StepPlan] = []
        runner = engine.actor("executor").runner
        execute = runner.execute

        def logged(plan: proto.StepPlan) -> proto.StepResult:
            self.plans.append(plan)
            return execute(plan)

        runner.execute = logged

    def num_scheduled(self, request_id: str) -> int:
        return sum(num for plan in self.plans for rid, _, num, _ in plan_rows(plan) if rid == request_id)


async def generate(engine: Engine, waves: list[dict[str, list[int]]], max_tokens: int = 8):
    """Greedy tokens and cached tokens per request; each wave is submitted once the previous one
    finished and the engine is idle again."""
    outputs: dict[str, list[int]] = {}
    cached: dict[str, int] = {}

    async def consume(request_id: str, stream) -> None:
        async for delta in stream:
            outputs[request_id] += proto.unpack_i32(delta.token_ids).tolist()
            cached[request_id] = delta.num_cached_tokens
            if delta.finish_reason is not None:
                assert delta.finish_reason == proto.FinishReason.LENGTH, delta.error

    for wave in waves:
        streams = []
        for request_id, prompt in wave.items():
            outputs[request_id] = []
            add = proto.AddRequest(request_id, proto.pack_i32(prompt), greedy(max_tokens))
            streams.append(consume(request_id, engine.add_request(add)))
        await asyncio.wait_for(asyncio.gather(*streams), 120)
        await engine.wait_idle()
    return outputs, cached


async def reference_outputs(model_dir, waves, **overrides) -> dict[str, list[int]]:
    async with running_engine(model_dir, enable_prefix_caching=False, **overrides) as engine:
        outputs, _ = await generate(engine, waves)
    return outputs


def assert_engine_idle_and_clean(engine: Engine) -> None:
    assert_all_free(engine)
    scheduler = engine.actor("scheduler").scheduler
    device, host = scheduler.tiers.device, scheduler.tiers.host
    assert device.num_cached_free + host.num_cached_free == len(scheduler.prefix_cache)


SYSTEM = [1] + [(i * 37) % 500 + 5 for i in range(23)]  # 24 tokens: ends on a block boundary
WAVES = [
    {"base": SYSTEM + [300, 301, 302]},
    {
        "boundary": SYSTEM + [310, 311, 312, 313, 314],  # shares the 6 full blocks of SYSTEM
        "mid": SYSTEM[:14] + [320, 321, 322, 323],  # diverges inside block 3 (shares 3 blocks)
        "same": SYSTEM + [300, 301, 302],  # identical to base: only its last partial block
        "exact": SYSTEM,  # a fully cached prompt: its last block is recomputed
        "other": [1, 400, 401, 402, 403, 404, 405],
    },
    {"again": SYSTEM + [310, 311, 312, 313, 314, 315, 316]},
]


@pytest.mark.parametrize("pooling", [False, True], ids=["device", "pie"])
async def test_greedy_tokens_are_the_same_with_and_without_prefix_caching(model_dir, pooling):
    overrides = dict(device_kv_blocks=24, kv_policy="pie", expansion="fixed:64") if pooling else {}
    reference = await reference_outputs(model_dir, WAVES, **overrides)
    async with running_engine(model_dir, **overrides) as engine:
        log = PlanLog(engine)
        outputs, cached = await generate(engine, WAVES)
        stats = engine.stats()
        assert_engine_idle_and_clean(engine)
    assert outputs == reference
    # Tokens each request got from the cache, and so did not prefill (always at least one token).
    assert cached == {"base": 0, "boundary": 24, "mid": 12, "same": 24, "exact": 20, "other": 0, "again": 28}
    num_prompt = {request_id: len(prompt) for wave in WAVES for request_id, prompt in wave.items()}
    for request_id, num_cached in cached.items():
        assert log.num_scheduled(request_id) == num_prompt[request_id] - num_cached + 8 - 1, request_id
    assert stats.prefix_cache_queries_total == sum(num_prompt.values())
    assert stats.prefix_cache_device_hits_total + stats.prefix_cache_host_hits_total == sum(cached.values())


@pytest.mark.parametrize("policy", ["pie", "swap"])
async def test_a_prefix_demoted_to_host_is_hit_from_host(model_dir, policy):
    # 10 device blocks of 4 tokens: each filler evicts everything the previous requests left cached.
    # pie streams the host hit (or promotes it); swap promotes it (running requests are on the device).
    overrides = dict(
        device_kv_blocks=10, kv_policy=policy, expansion="fixed:64", host_kv_gib=0.01, max_num_seqs=1
    )
    rng = random.Random(0)
    fillers = {f"filler{i}": [1] + [rng.randrange(5, 500) for _ in range(30)] for i in range(3)}
    waves = [
        {"first": SYSTEM + [300, 301]},
        *({k: v} for k, v in fillers.items()),
        {"second": SYSTEM + [300, 301]},
    ]
    reference = await reference_outputs(model_dir, waves, **overrides)
    async with running_engine(model_dir, **overrides) as engine:
        log = PlanLog(engine)
        outputs, cached = await generate(engine, waves)
        stats = engine.stats()
        prefix_stats = engine.actor("scheduler").scheduler.prefix_cache_stats
        assert_engine_idle_and_clean(engine)
    assert outputs == reference
    assert stats.prefix_cache_host_hits_total > 0
    assert prefix_stats.num_demotions > 0
    assert cached["second"] == 24 and log.num_scheduled("second") == 2 + 8 - 1
    assert stats.bytes_to_device_total > 0  # the hit was streamed (or promoted) from host memory
    if policy == "swap":
        assert prefix_stats.num_promotions == 6


@st.composite
def engine_workloads(draw):
    """Prompts from a few shared prefixes (lengths on and off block boundaries), arriving over time."""
    prefixes = [
        [1] + [draw(st.integers(5, 500)) for _ in range(draw(st.integers(0, 30)))]
        for _ in range(draw(st.integers(1, 3)))
    ]
    requests = []
    for i in range(draw(st.integers(2, 8))):
        prefix = draw(st.sampled_from(prefixes))
        suffix = [draw(st.integers(5, 500)) for _ in range(draw(st.integers(0, 9)))]
        requests.append(
            dict(
                id=f"r{i}",
                prompt=prefix + suffix,
                max_tokens=draw(st.integers(1, 10)),
                arrival=draw(st.integers(0, 12)),
                abort_at=draw(st.one_of(st.none(), st.none(), st.integers(0, 16))),
            )
        )
    policy = draw(st.sampled_from(["none", "swap", "pie"]))
    return requests, policy, draw(st.integers(12, 24)), draw(st.sampled_from([5, 64]))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("prefix-prop"), "llama")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(engine_workloads())
def test_random_shared_prefix_workloads_match_no_caching(llama_dir, workload):
    asyncio.run(run_shared_prefix_workload(llama_dir, workload))


async def run_shared_prefix_workload(model_dir, workload) -> None:
    requests, policy, device_blocks, chunk = workload
    async with running_engine(model_dir, enable_prefix_caching=False, max_num_batched_tokens=chunk) as engine:
        reference = await drive(engine, requests)
    overrides = dict(device_kv_blocks=device_blocks, max_num_batched_tokens=chunk)
    if policy != "none":
        overrides.update(kv_policy=policy, expansion="fixed:48", host_kv_gib=0.01)
    async with running_engine(model_dir, **overrides) as engine:
        assert_tokens_match(await drive(engine, requests), reference)
        assert_engine_idle_and_clean(engine)
