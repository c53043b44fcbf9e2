"""Host memory pooling end to end: greedy tokens are the same under every memory policy, and
nothing leaks (blocks of either tier, host segments)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import build_model_dir

import proto
from pied.inproc import EngineCore
from proto.config import EngineConfig

PROMPTS = [
    [1, 17, 99, 3, 250],
    [1] + list(range(40, 77)),
    [1] + [(i * 37) % 500 + 5 for i in range(70)],
    [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314],
    [1] + [(i * 11) % 400 + 20 for i in range(23)],
    [1, 5, 6],
]
MAX_TOKENS = 20
BLOCK_SIZE = 4


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "qwen3", "gemma3", "phi3", "smollm3"])
def model_dir(request, tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp(request.param), request.param)


def make_engine(model_dir, **overrides) -> EngineCore:
    config = EngineConfig(model=str(model_dir), dtype="float32", block_size=BLOCK_SIZE, **overrides)
    return EngineCore(config)


def run_to_completion(engine: EngineCore, requests: dict[str, list[int]], max_tokens=MAX_TOKENS):
    """Greedy outputs per request id, all submitted at once."""
    params = proto.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for request_id, prompt in requests.items():
        assert engine.add_request(proto.AddRequest(request_id, proto.pack_i32(prompt), params)) == []
    outputs: dict[str, list[int]] = {request_id: [] for request_id in requests}
    finish: dict[str, proto.FinishReason] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            outputs[delta.request_id].extend(proto.unpack_i32(delta.token_ids).tolist())
            if delta.finish_reason is not None:
                finish[delta.request_id] = delta.finish_reason
    assert all(reason == proto.FinishReason.LENGTH for reason in finish.values()), finish
    return outputs


def assert_all_free(engine: EngineCore) -> None:
    scheduler = engine.scheduler
    assert not scheduler.has_unfinished()
    assert scheduler.usage == 0.0
    assert scheduler.num_host_blocks_used == 0
    assert scheduler.block_manager.num_free == engine.runner.num_device_blocks


def open_memfds() -> int:
    """memfd descriptors this process holds (host segments are memfds)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pied-kv"):
                count += 1
        except OSError:
            pass
    return count


# Device budget: 24 blocks of 4 tokens for 6 requests needing up to 23 blocks each, so the
# batch overflows the device about 5x; the host tier takes the rest.
TIGHT = dict(device_kv_blocks=24)


def test_policies_give_identical_greedy_tokens(model_dir):
    requests = {str(i): prompt for i, prompt in enumerate(PROMPTS)}
    reference = run_to_completion(make_engine(model_dir), requests)
    results = {}
    for name, overrides in {
        "none": TIGHT,
        "swap": dict(TIGHT, kv_policy="swap", expansion="fixed:96", host_kv_gib=0.01),
        "pie": dict(TIGHT, kv_policy="pie", expansion="fixed:96"),
    }.items():
        engine = make_engine(model_dir, **overrides)
        results[name] = run_to_completion(engine, requests)
        assert results[name] == reference, name
        if name == "pie":
            # Most of the batch's KV lived on host and was streamed, and pooling ran more at once.
            assert engine.totals.bytes_to_device > 0
            assert engine.scheduler.num_preemptions < make_engine_preemptions(model_dir, requests)
        if name == "swap":
            assert engine.scheduler.num_swap_outs > 0
        assert_all_free(engine)
        engine.close()


def make_engine_preemptions(model_dir, requests) -> int:
    engine = make_engine(model_dir, **TIGHT)
    run_to_completion(engine, requests)
    return engine.scheduler.num_preemptions


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


def drive(engine: EngineCore, workload) -> dict[str, tuple[list[int], proto.FinishReason]]:
    """Arrivals and aborts at given steps; returns tokens and finish reason per request."""
    outputs: dict[str, list[int]] = {}
    finish: dict[str, proto.FinishReason] = {}
    step = 0
    while True:
        for request in workload:
            if request["arrival"] == step:
                params = proto.SamplingParams(temperature=0, max_tokens=request["max_tokens"], ignore_eos=True)
                outputs[request["id"]] = []
                engine.add_request(proto.AddRequest(request["id"], proto.pack_i32(request["prompt"]), params))
            if request["abort_at"] == step and request["id"] in outputs:
                for delta in engine.abort([request["id"]]):
                    finish[delta.request_id] = delta.finish_reason
        for delta in engine.step():
            outputs[delta.request_id].extend(proto.unpack_i32(delta.token_ids).tolist())
            if delta.finish_reason is not None:
                finish[delta.request_id] = delta.finish_reason
        step += 1
        if step > max(r["arrival"] for r in workload) and not engine.has_unfinished():
            return {request_id: (outputs[request_id], finish[request_id]) for request_id in outputs}
        assert step < 2000, "no progress"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workloads())
def test_random_workloads_match_device_only(llama_dir, workload):
    requests, policy, device_blocks, chunk = workload
    memfds_before = open_memfds()
    reference_engine = make_engine(llama_dir, max_num_batched_tokens=chunk)
    reference = drive(reference_engine, requests)
    engine = make_engine(
        llama_dir,
        device_kv_blocks=device_blocks,
        max_num_batched_tokens=chunk,
        kv_policy=policy,
        expansion="fixed:64",
        host_kv_gib=0.01,
    )
    pooled = drive(engine, requests)
    for request_id, (tokens, reason) in pooled.items():
        reference_tokens, reference_reason = reference[request_id]
        if reason == proto.FinishReason.ABORT or reference_reason == proto.FinishReason.ABORT:
            # An abort lands at a step, and the pooled run may be at another point of the request.
            n = min(len(tokens), len(reference_tokens))
            assert tokens[:n] == reference_tokens[:n]
        else:
            assert (tokens, reason) == (reference_tokens, reference_reason)
    assert_all_free(engine)
    engine.close()
    assert open_memfds() == memfds_before


# ---------------------------------------------------------------- the daemon's worker processes


def memfds_of(pid: int) -> int:
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:pied-kv"):
                    count += 1
            except OSError:
                pass
    except FileNotFoundError:
        return 0
    return count


async def collect(stream) -> list[int]:
    tokens: list[int] = []
    async for delta in stream:
        tokens.extend(proto.unpack_i32(delta.token_ids).tolist())
    return tokens


@pytest.mark.parametrize("victim", ["memory", "executor"])
async def test_pie_through_worker_processes_then_kill(tmp_path, victim):
    """The memory manager process grants the lease and creates the segments; the executor maps
    them; greedy tokens equal device-only; killing either leaves nothing in /dev/shm."""
    import asyncio
    import signal

    from daemon import shm_entries, wait_gone

    from pied.engine_client import EngineDeadError
    from pied.mp_client import ProcessEngineClient

    model_dir = build_model_dir(tmp_path / "model", "llama")
    reference_engine = make_engine(model_dir)
    requests = {str(i): prompt for i, prompt in enumerate(PROMPTS)}
    reference = run_to_completion(reference_engine, requests)

    config = EngineConfig(
        model=str(model_dir), dtype="float32", block_size=BLOCK_SIZE, kv_policy="pie", expansion="fixed:96", **TIGHT
    )
    client = ProcessEngineClient(config)
    await client.start()
    pids = dict(client.worker_pids)
    try:
        params = proto.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        streams = [
            client.add_request(proto.AddRequest(request_id, proto.pack_i32(prompt), params))
            for request_id, prompt in requests.items()
        ]
        outputs = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 120)
        assert dict(zip(requests, outputs)) == reference
        for _ in range(100):  # the idle Stats snapshot
            stats = client.stats()
            if stats.device_usage == 0.0 and stats.num_running == 0:
                break
            await asyncio.sleep(0.05)
        assert stats.host_lease == 96 and stats.bytes_to_device_total > 0
        assert stats.device_usage == 0.0 and stats.host_usage == 0.0
        # The segments are memfds held by the memory manager (and mapped by the executor).
        assert memfds_of(pids["memory"]) > 0
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
    from pied.engine_client import EngineStats
    from pied.metrics import ServerMetrics

    stats = EngineStats(
        device_usage=0.5,
        host_usage=0.25,
        host_lease=96,
        host_lease_target=120,
        host_decision='grow: demand, stalls 0.3% < 2% "x"',
        host_link_bandwidth=2.5e10,
        bytes_to_device_total=1 << 30,
        bytes_to_host_total=1 << 20,
        stall_seconds_total=0.125,
    )
    text = ServerMetrics().render(stats)
    lines = set(text.splitlines())
    assert 'pied:kv_cache_usage_perc{tier="device"} 0.5' in lines
    assert 'pied:kv_cache_usage_perc{tier="host"} 0.25' in lines
    assert "pied:host_kv_lease_blocks 96" in lines or "pied:host_kv_lease_blocks 96.0" in lines
    assert any(line.startswith("pied:host_kv_lease_target_blocks 120") for line in lines)
    assert any(line.startswith("pied:host_kv_link_bandwidth_bytes_per_second 25000000000") for line in lines), text
    assert any(line.startswith('pied:host_kv_controller_decision{action="grow",reason="demand, stalls 0.3% < 2% \\"x\\""}') for line in lines), text
    assert any(line.startswith('pied:kv_bytes_transferred_total{direction="host_to_device"} 1073741824') for line in lines)
    assert any(line.startswith("pied:stall_seconds_total 0.125") for line in lines)
