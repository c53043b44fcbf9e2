"""Host memory pooling end to end: greedy tokens are the same under every memory policy, and
nothing leaks (blocks of either tier, host segments)."""

from __future__ import annotations

import asyncio
import os

import pytest
from engine_driver import (
    BLOCK_SIZE,
    assert_all_free,
    assert_tokens_match,
    collect,
    drive,
    generate,
    mapped_segments,
    open_memfds,
    running_engine,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import build_model_dir

import proto
from proto.config import EngineConfig

PROMPTS = [
    [1, 17, 99, 3, 250],
    [1] + list(range(40, 77)),
    [1] + [(i * 37) % 500 + 5 for i in range(70)],
    [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314],
    [1] + [(i * 11) % 400 + 20 for i in range(23)],
    [1, 5, 6],
]
REQUESTS = {str(i): prompt for i, prompt in enumerate(PROMPTS)}
MAX_TOKENS = 20


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "qwen3", "gemma3", "phi3", "smollm3"])
def model_dir(request, tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp(request.param), request.param)


# Device budget: 24 blocks of 4 tokens for 6 requests needing up to 23 blocks each, so the
# batch overflows the device about 5x; the host tier takes the rest.
TIGHT = dict(device_kv_blocks=24)
POLICIES = {
    "none": TIGHT,
    "swap": dict(TIGHT, kv_policy="swap", expansion="fixed:96", host_kv_gib=0.01),
    "pie": dict(TIGHT, kv_policy="pie", expansion="fixed:96"),
}


async def reference_tokens(model_dir) -> dict[str, list[int]]:
    """Greedy tokens with a device large enough for the whole batch (about 140 blocks)."""
    async with running_engine(model_dir, device_kv_blocks=256) as engine:
        return await generate(engine, REQUESTS, MAX_TOKENS)


async def test_policies_give_identical_greedy_tokens(model_dir):
    reference = await reference_tokens(model_dir)
    memfds_before = open_memfds()
    num_preemptions = {}
    for name, overrides in POLICIES.items():
        async with running_engine(model_dir, **overrides) as engine:
            assert await generate(engine, REQUESTS, MAX_TOKENS) == reference, name
            stats = engine.stats()
            num_preemptions[name] = stats.num_preemptions
            if name == "pie":
                # Most of the batch's KV lived on host and was streamed.
                assert stats.bytes_to_device_total > 0 and stats.host_lease == 96
                assert open_memfds() > 0 and mapped_segments() > 0  # the host segments, in this process
            if name == "swap":
                assert engine.actor("scheduler").scheduler.num_swap_outs > 0
            assert_all_free(engine)
        # Shut down: every host segment is closed and unmapped.
        assert open_memfds() == memfds_before and mapped_segments() == 0
    # Pooling ran more at once than the device alone could.
    assert num_preemptions["pie"] < num_preemptions["none"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("llama-prop"), "llama")


@st.composite
def workloads(draw):
    num_requests = draw(st.integers(1, 6))
    requests = []
    for i in range(num_requests):
        length = draw(st.integers(1, 40))
        prompt = [1] + [draw(st.integers(5, 500)) for _ in range(length)]
        requests.append(
            dict(
                id=f"r{i}",
                prompt=prompt,
                max_tokens=draw(st.integers(1, 16)),
                arrival=draw(st.integers(0, 8)),
                abort_at=draw(st.one_of(st.none(), st.integers(0, 12))),
            )
        )
    policy = draw(st.sampled_from(["swap", "pie"]))
    device_blocks = draw(st.integers(16, 30))
    chunk = draw(st.sampled_from([7, 64, 2048]))
    return requests, policy, device_blocks, chunk


async def run_random_workload(model_dir, workload) -> None:
    requests, policy, device_blocks, chunk = workload
    memfds_before = open_memfds()
    async with running_engine(model_dir, max_num_batched_tokens=chunk) as engine:
        reference = await drive(engine, requests)
    overrides = dict(
        device_kv_blocks=device_blocks,
        max_num_batched_tokens=chunk,
        kv_policy=policy,
        expansion="fixed:64",
        host_kv_gib=0.01,
    )
    async with running_engine(model_dir, **overrides) as engine:
        assert_tokens_match(await drive(engine, requests), reference)
        assert_all_free(engine)
    assert open_memfds() == memfds_before and mapped_segments() == 0


# 25 examples of two engines each: 215 s here on 2 cores shared with other suites, near the
# default 300 s. The work is bounded; its time is not.
@pytest.mark.timeout(1200)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workloads())
def test_random_workloads_match_device_only(llama_dir, workload):
    asyncio.run(run_random_workload(llama_dir, workload))


# ---------------------------------------------------------------- the daemon's worker processes


@pytest.mark.parametrize("victim", ["memory", "executor"])
async def test_pie_through_worker_processes_then_kill(tmp_path, victim):
    """The memory manager process grants the lease and creates the segments; the executor maps
    them; greedy tokens equal device-only; killing either leaves nothing in /dev/shm."""
    import signal

    from daemon import shm_entries, wait_gone

    from pied.engine import Engine
    from pied.engine_client import EngineDeadError

    model_dir = build_model_dir(tmp_path / "model", "llama")
    requests = REQUESTS
    reference = await reference_tokens(model_dir)

    config = EngineConfig(
        model=str(model_dir), dtype="float32", block_size=BLOCK_SIZE, kv_policy="pie", expansion="fixed:96", **TIGHT
    )
    client = Engine(config, workers="processes")
    await client.start()
    pids = dict(client.worker_pids)
    try:
        params = proto.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        streams = [
            client.add_request(proto.AddRequest(request_id, proto.pack_i32(prompt), params))
            for request_id, prompt in requests.items()
        ]
        outputs = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 120)
        assert {request_id: tokens for request_id, (tokens, _) in zip(requests, outputs)} == reference
        stats = await client.wait_idle()
        assert stats.host_lease == 96 and stats.bytes_to_device_total > 0
        assert stats.device_usage == 0.0 and stats.host_usage == 0.0
        # The segments are memfds held by the memory manager (and mapped by the executor).
        assert open_memfds(pids["memory"]) > 0
        assert not shm_entries()

        # Kill one worker mid-generation: every caller gets an error, every worker goes.
        long = proto.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = client.add_request(proto.AddRequest("long", proto.pack_i32(PROMPTS[1]), long))
        deltas = aiter(stream)
        await asyncio.wait_for(anext(deltas), 30)  # mid-generation: its first token is out
        os.kill(pids[victim], signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(collect(deltas), 2.0)
        assert client.dead
    finally:
        await client.shutdown()
    assert wait_gone(list(pids.values()), 10) == []
    assert not shm_entries()


def test_metrics_show_both_tiers_the_lease_and_the_controller():
    from prometheus_client.parser import text_string_to_metric_families

    from pied.metrics import ServerMetrics

    stats = proto.Stats(
        device_usage=0.5,
        host_usage=0.25,
        host_lease=96,
        host_lease_target=120,
        host_decision='grow: demand, stalls 0.3% < 2% "x"',
        host_link_bandwidth=2.5e10,
        bytes_to_device_total=1 << 30,
        bytes_to_host_total=1 << 20,
        stall_seconds_total=0.125,
        num_host_blocks_used=7,
    )
    text = ServerMetrics("m").render(stats)
    # The tiers are separate series (a sum() over one never adds the other tier's fraction).
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    model = ("model_name", "m")
    assert samples["pied:kv_cache_usage_perc", (model,)] == 0.5
    assert samples["pied:host_kv_cache_usage_perc", (model,)] == 0.25
    assert samples["pied:host_kv_lease_blocks", (model,)] == 96
    assert samples["pied:host_kv_blocks_in_use", (model,)] == 7
    assert samples["pied:host_kv_lease_target_blocks", (model,)] == 120
    assert samples["pied:host_kv_link_bandwidth_bytes_per_second", (model,)] == 2.5e10
    decision = (("action", "grow"), model, ("reason", 'demand, stalls 0.3% < 2% "x"'))
    assert samples["pied:host_kv_controller_decision", decision] == 1
    assert samples["pied:kv_bytes_transferred_total", (("direction", "host_to_device"), model)] == 1 << 30
    assert samples["pied:kv_bytes_transferred_total", (("direction", "device_to_host"), model)] == 1 << 20
    assert samples["pied:stall_seconds_total", (model,)] == 0.125
