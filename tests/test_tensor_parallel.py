"""Tensor parallelism (DESIGN.md "Parallelism"): two executor ranks over gloo on this CPU.

- each rank reads only its slices of the checkpoint (fused Phi-3 tensors included), and the ranks'
  slices put together are the checkpoint;
- TP=2 greedy tokens equal TP=1's and transformers', through ``pied.LLM`` under every KV policy at a
  tight device budget, on every architecture the repository supports, and through a real ``pied serve``;
- TP=2 prompt logprobs (over chunked prefill) equal TP=1's and transformers';
- adaptive expansion grows the lease under demand and steers by the slowest rank's stalls;
- a size the model's heads do not split over is refused before any worker starts (exit 2);
- ``/metrics`` of a real ``pied serve`` has every rank's own series, consistent with the totals;
- kill -9 of one rank fails every request in flight, the daemon exits non-zero, nothing is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from daemon import cmdline, live_pids, shm_entries, wait_gone
from engine_driver import (
    OPTIONS,
    LeaseWaves,
    engine_config,
    generate,
    mapped_segments,
    random_prompts,
    running_engine,
)
from safetensors.torch import load_file
from server import EventStream, running_server
from test_engine import hf_greedy
from test_preflight import assert_refused
from test_prompt_logprobs import ATOL, check_against_reference
from tiny_models import load_hf_model

import proto
from pied.engine import Engine
from pied.llm import LLM
from workers.executor.model import CausalLM
from workers.executor.parallel import ShardedTarget, TensorParallel
from workers.executor.weights import load_weights
from workers.memory.controller import StepSample
from workers.memory.rank_steps import SlowestRank
from workers.model_config import ModelConfig

PROMPTS = [[1, 17, 99, 3, 250], [1] + list(range(40, 77)), [1] + [(i * 11) % 400 + 20 for i in range(23)]]
MAX_TOKENS = 12
GREEDY = proto.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# 6 blocks of 4 tokens hold one of the requests at a time: the others are preempted (none), swapped
# (swap) or served from host blocks (pie).
TIGHT = dict(block_size=4, device_kv_blocks=16)
POLICIES = {
    "none": TIGHT,
    "swap": dict(TIGHT, kv_policy="swap", expansion="fixed:48", host_kv_gib=0.01),
    "pie": dict(TIGHT, kv_policy="pie", expansion="fixed:48"),
}


def greedy_tokens(llm: LLM) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in PROMPTS], GREEDY)
    return [output.outputs[0].token_ids for output in outputs]


# ---------------------------------------------------------------- shards (no process group needed)


def test_kv_heads_split_or_replicated():
    # 4 query heads, 2 KV heads over 2 ranks: one KV head each.
    assert [TensorParallel(rank, 2).kv_heads(4, 2) for rank in range(2)] == [(0, 1), (1, 2)]
    # 8 query heads, 2 KV heads over 4 ranks: ranks 0-1 hold KV head 0, ranks 2-3 KV head 1.
    assert [TensorParallel(rank, 4).kv_heads(8, 2) for rank in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert TensorParallel(1, 2).split(128) == (64, 128)
    with pytest.raises(ValueError):
        TensorParallel(0, 3).split(4)


def test_the_controller_sees_the_slowest_rank_once_per_step():
    ranks = SlowestRank(2)
    fast = StepSample(step_time=0.010, forward_time=0.009, stall_time=0.0, num_host_blocks=4, bytes_to_device=1, num_layers=2)
    slow = StepSample(step_time=0.012, forward_time=0.009, stall_time=0.003, num_host_blocks=4, bytes_to_device=1, num_layers=2)
    assert ranks.add(7, slow) is None  # rank 1's span came first: wait for rank 0's
    assert ranks.add(8, fast) is None
    assert ranks.add(7, fast) is slow  # the step is as transparent as its slowest rank
    assert ranks.add(8, fast) is fast
    assert SlowestRank(1).add(9, fast) is fast


def test_rank_totals_reach_the_metrics_by_rank():
    from prometheus_client.parser import text_string_to_metric_families

    from pied.metrics import ServerMetrics
    from workers.scheduler.rank_totals import RankTotals

    assert RankTotals(1).ranks == []  # one rank: the engine-wide series say it all
    totals = RankTotals(2)
    totals.add_result(proto.StepResult(0, b"", step_time=0.5, forward_time=0.4, stall_time=0.1, bytes_to_device=64, num_staging_blocks=8))
    totals.add_rank_step(proto.RankStep(0, 1, step_time=0.7, forward_time=0.6, stall_time=0.3, bytes_to_device=64, bytes_to_host=16, num_staging_blocks=8))
    totals.add_rank_step(proto.RankStep(1, 1, step_time=0.1, forward_time=0.1))
    with pytest.raises(ValueError, match="rank 2"):
        totals.add_rank_step(proto.RankStep(1, 2))
    text = ServerMetrics("m").render(proto.Stats(ranks=totals.ranks))
    samples = {
        (sample.name, sample.labels.get("rank"), sample.labels.get("direction")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples["pied:rank_steps_total", "0", None] == 1 and samples["pied:rank_steps_total", "1", None] == 2
    assert samples["pied:rank_step_seconds_total", "1", None] == pytest.approx(0.8)
    assert samples["pied:rank_forward_seconds_total", "0", None] == 0.4
    assert samples["pied:rank_stall_seconds_total", "1", None] == 0.3
    assert samples["pied:rank_staging_blocks", "1", None] == 0  # as of its last step
    assert samples["pied:rank_kv_bytes_transferred_total", "0", "host_to_device"] == 64
    assert samples["pied:rank_kv_bytes_transferred_total", "1", "device_to_host"] == 16
    assert "pied:rank_" not in ServerMetrics("m").render(proto.Stats())  # one rank: no per-rank series


def rank_shard(folder, rank: int) -> tuple[CausalLM, int]:
    model = CausalLM(ModelConfig.from_folder(folder), torch.float32, tp=TensorParallel(rank, 2))
    return model, load_weights(model.checkpoint_targets(), folder)


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # phi3: fused qkv_proj and gate_up_proj
def test_each_rank_reads_only_its_shard(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    checkpoint = load_file(folder / "model.safetensors")
    checkpoint_bytes = sum(tensor.nbytes for tensor in checkpoint.values())
    shards = [rank_shard(folder, rank) for rank in range(2)]
    full_numel = sum(tensor.numel() for tensor in checkpoint.values())
    for model, bytes_read in shards:
        # Half of every large tensor; only the norms (a few hundred floats) are read by both.
        assert bytes_read < 0.55 * checkpoint_bytes, (bytes_read, checkpoint_bytes)
        assert sum(p.numel() for p in model.parameters()) < 0.55 * full_numel
    assert sum(bytes_read for _, bytes_read in shards) >= checkpoint_bytes
    # The ranks' slices put together are the checkpoint's tensors, fused ones included.
    for name, tensor in checkpoint.items():
        parts = []
        for model, _ in shards:
            target = model.checkpoint_targets()[name]
            if not isinstance(target, ShardedTarget):  # replicated (norms, row-parallel biases)
                assert torch.equal(target, tensor), name
                continue
            for destination, start, stop in target.pieces:
                parts.append((start, destination))
                expected = tensor.narrow(target.dim, start, stop - start)
                assert torch.equal(destination, expected), name
        if parts:
            target = shards[0][0].checkpoint_targets()[name]
            covered = sum(destination.shape[target.dim] for _, destination in parts)
            assert covered == tensor.shape[target.dim], name


# ---------------------------------------------------------------- refused before any worker starts


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_heads_that_do_not_divide_exit_2(tiny_model_dir, command):
    folder = tiny_model_dir("llama")  # 4 attention heads
    flags = ["--model", str(folder), "--tensor-parallel-size", "3"]
    assert_refused(command, flags, "--tensor-parallel-size 3", "num_attention_heads")


def test_threads_cannot_hold_two_ranks(tiny_model_dir):
    folder = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="worker processes"):
        LLM(str(folder), tensor_parallel_size=2, workers="threads")
    assert_refused("serve", ["--model", str(folder), "--tensor-parallel-size", "2", "--inproc"], "--inproc")


# ---------------------------------------------------------------- TP=2 == TP=1 == transformers


# qwen3: GQA, q/k norms, head_dim 24; phi3: fused qkv_proj and gate_up_proj checkpoints; mqa: one
# KV head, replicated on both ranks.
ARCHES = {
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "mqa": ("llama", {"num_key_value_heads": 1}),
}


@pytest.fixture(scope="module", params=list(ARCHES))
def arch_reference(request, tiny_model_dir):
    arch, build = ARCHES[request.param]
    folder = tiny_model_dir(arch, **build)
    with LLM(str(folder), dtype="float32", device_kv_blocks=256) as llm:
        reference = greedy_tokens(llm)
    hf = load_hf_model(folder)
    for prompt, tokens in zip(PROMPTS, reference):
        expected = hf_greedy(hf, prompt, MAX_TOKENS)
        assert tokens[: len(expected)] == expected
    return request.param, folder, reference


@pytest.mark.parametrize("policy", list(POLICIES))
def test_two_ranks_give_the_same_greedy_tokens(arch_reference, policy):
    arch, folder, reference = arch_reference
    if arch != "llama" and policy != "none":
        pytest.skip("the policies are covered on llama; the other architectures check the sharding")
    with LLM(str(folder), dtype="float32", tensor_parallel_size=2, **POLICIES[policy]) as llm:
        assert llm.engine.workers == "processes"
        assert {"executor", "executor-1"} <= set(llm.engine.worker_pids)
        assert greedy_tokens(llm) == reference
        if policy != "none":
            # pie: host blocks were streamed to both ranks. (swap: whether blocks go to the host at
            # all depends on how the requests' arrivals batch them; on a fast machine possibly none:
            # its tokens are what is checked.) The scheduler's Stats trail the tokens: wait for the
            # idle snapshot.
            deadline = time.monotonic() + 60
            while True:
                stats = llm.engine.stats()
                idle = stats.num_running == 0 and stats.num_waiting == 0
                if idle and (policy != "pie" or stats.bytes_to_device_total > 0):
                    break
                assert time.monotonic() < deadline, stats
                time.sleep(0.05)


# ---------------------------------------------------------------- the other architectures, prompt logprobs

# What each adds to the four above: mistral a sliding window; qwen2 qkv biases (column-parallel, so
# split with their rows); smollm3 layers without RoPE and tied embeddings; gemma3 sliding and global
# layers, logit soft-capping and tied embeddings. Lean for CI: one 12-token prompt each, a few tokens.
MORE_ARCHES = ["mistral", "qwen2", "smollm3", "gemma3"]
SHORT_PROMPT = PROMPTS[2][:12]
SHORT_TOKENS = 6
# Prompt logprobs over two prefill chunks (8 tokens a step): rank 1 keeps its states' logprob rows
# in step with rank 0's, which alone gathers the whole vocabulary and computes them.
CHUNKED = dict(block_size=4, max_num_batched_tokens=8)


@pytest.mark.parametrize("arch", MORE_ARCHES)
def test_two_ranks_on_more_architectures_with_prompt_logprobs(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    params = proto.SamplingParams(temperature=0.0, max_tokens=SHORT_TOKENS, ignore_eos=True, prompt_logprobs=3)
    outputs = {}
    for size in (1, 2):
        with LLM(str(folder), dtype="float32", tensor_parallel_size=size, **CHUNKED) as llm:
            outputs[size] = llm.generate([{"prompt_token_ids": SHORT_PROMPT}], params)[0]
    hf = load_hf_model(folder)
    expected = hf_greedy(hf, SHORT_PROMPT, SHORT_TOKENS)
    one, two = (outputs[size].outputs[0].token_ids for size in (1, 2))
    assert one[: len(expected)] == expected
    assert two == one
    with torch.no_grad():
        reference = hf(torch.tensor([SHORT_PROMPT])).logits[0].float().log_softmax(dim=-1)
    check_against_reference(outputs[2].prompt_logprobs, SHORT_PROMPT, reference, 3)
    for entry_one, entry_two in zip(outputs[1].prompt_logprobs[1:], outputs[2].prompt_logprobs[1:]):
        assert list(entry_two) == list(entry_one)  # the same tokens, in the same order
        for token_id, one_rank in entry_one.items():
            assert entry_two[token_id].logprob == pytest.approx(one_rank.logprob, abs=ATOL)
            assert entry_two[token_id].rank == one_rank.rank


# ---------------------------------------------------------------- adaptive expansion

# Deeper and wider than the other tiny models (as test_adaptive's), so a step computes long enough
# to hide copies.
ADAPTIVE_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4)
ADAPTIVE_TOKENS = 20


async def test_adaptive_expansion_steers_by_the_slowest_rank(tiny_model_dir, tmp_path):
    """``--kv-policy pie`` with adaptive expansion at TP=2, through worker processes: under demand
    the controller grows the lease (both ranks map the new segments) and greedy tokens equal TP=1
    throughout. Then only rank 1's link is cut (a test-only throttle file per rank; rank 0's stays
    fast): the controller, which takes each step's slowest rank from both ranks' step spans, sees
    rank 1's stalls and shrinks the lease. Driven wave by wave until each condition holds, so it
    does not depend on how fast the machine is."""
    folder = tiny_model_dir("llama", **ADAPTIVE_MODEL)
    requests = random_prompts(16, seed=1)
    async with running_engine(folder, device_kv_blocks=512) as engine:
        reference = await generate(engine, requests, ADAPTIVE_TOKENS)
    throttle = tmp_path / "copy-throttle-{rank}"
    config = engine_config(
        folder,
        device_kv_blocks=24,  # the batch overflows it about 8x
        kv_policy="pie",
        expansion="adaptive",
        host_kv_gib=0.002,
        tensor_parallel_size=2,
        extra={"copy_throttle_file": str(throttle)},
    )
    client = Engine(config, OPTIONS, workers="processes")
    await client.start()
    pids = dict(client.worker_pids)
    mapped = {rank: 0 for rank in range(2)}

    def map_counts() -> None:
        for rank, name in enumerate(("executor", "executor-1")):
            mapped[rank] = max(mapped[rank], mapped_segments(pids[name]))

    waves = LeaseWaves(client, requests, reference, ADAPTIVE_TOKENS, on_sample=map_counts)
    watcher = asyncio.create_task(waves.watch())
    try:
        fast_peak = await waves.grow(48)  # both links fast: the lease grows with demand
        assert fast_peak >= 48, waves.samples
        assert mapped[0] > 0 and mapped[1] > 0, mapped  # each rank mapped the segments it streams from
        before = client.stats().ranks
        Path(str(throttle).replace("{rank}", "1")).write_text("4e6")  # rank 1's link only
        leases = await waves.settle_at_most(fast_peak // 2)  # a whole wave at half the fast lease or less
        assert max(leases) <= fast_peak // 2, (fast_peak, leases)
        assert waves.decided("shrink"), waves.samples
        after = client.stats().ranks
        stalls = [after[rank].stall_seconds_total - before[rank].stall_seconds_total for rank in range(2)]
        assert stalls[1] > stalls[0], stalls  # the stalls the lease shrank for were rank 1's
        print(f"lease: fast peak {fast_peak}, at most {max(leases)} in the last wave; stall seconds by rank while rank 1's link was cut: {stalls}")
    finally:
        watcher.cancel()
        await client.shutdown()
    assert wait_gone(list(pids.values()), 10) == []


# ---------------------------------------------------------------- pied serve


def rank_pids(daemon_pid: int) -> dict[int, int]:
    """The daemon's executor processes by tensor-parallel rank (from their WorkerArgs)."""
    ranks = {}
    for pid in live_pids():
        command = cmdline(pid)
        if "workers.executor" in command and str(daemon_pid) == _parent(pid):
            ranks[json.loads([arg for arg in command if arg][-1]).get("rank", 0)] = pid
    return ranks


def _parent(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return ""


# 8 device blocks of 4 tokens: the 38-token prompt and its 12 tokens stream host blocks to both ranks
# (and 128 host blocks hold a 400-token stream).
SERVE_POOLED = ("--kv-policy", "pie", "--expansion", "fixed:128", "--block-size", "4", "--device-kv-blocks", "8")


def rank_series(metrics: dict[str, float], name: str, rank: int, **labels: str) -> float:
    """The sample of ``name`` labelled ``rank`` and ``labels`` (in whatever order the text lists them)."""
    wanted = {f'rank="{rank}"', *(f'{key}="{value}"' for key, value in labels.items())}
    found = [value for key, value in metrics.items() if key.startswith(name + "{") and set(key[len(name) + 1 : -1].split(",")) == wanted]
    assert len(found) == 1, (name, wanted, sorted(key for key in metrics if key.startswith(name)))
    return found[0]


def check_rank_metrics(server) -> dict[str, float]:
    """``/metrics`` once the engine is idle: every rank's series present, consistent with the
    engine-wide (rank 0's) totals and with each other."""
    deadline = time.monotonic() + 60
    while True:  # rank 1's figures for the last step may trail rank 0's result
        metrics = server.metrics()
        steps = [rank_series(metrics, "pied:rank_steps_total", rank) for rank in range(2)]
        if steps[0] > 0 and steps[0] == steps[1] and metrics["pied:num_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, steps
        time.sleep(0.05)
    assert not any('rank="2"' in key for key in metrics)
    # Rank 0's series are the engine-wide ones (the StepResults the scheduler waits for).
    assert rank_series(metrics, "pied:rank_step_seconds_total", 0) == metrics["pied:step_seconds_total"]
    assert rank_series(metrics, "pied:rank_stall_seconds_total", 0) == metrics["pied:stall_seconds_total"]
    for direction in ("host_to_device", "device_to_host"):
        total = metrics[f'pied:kv_bytes_transferred_total{{direction="{direction}"}}']
        per_rank = [rank_series(metrics, "pied:rank_kv_bytes_transferred_total", rank, direction=direction) for rank in range(2)]
        # Each rank moves its own half of every host block's KV heads: the same bytes as rank 0.
        assert per_rank == [total, total], (direction, per_rank)
    assert metrics['pied:kv_bytes_transferred_total{direction="host_to_device"}'] > 0
    for rank in range(2):
        step = rank_series(metrics, "pied:rank_step_seconds_total", rank)
        forward = rank_series(metrics, "pied:rank_forward_seconds_total", rank)
        stall = rank_series(metrics, "pied:rank_stall_seconds_total", rank)
        assert 0 <= stall <= forward <= step, (rank, stall, forward, step)
        assert forward > 0
        assert rank_series(metrics, "pied:rank_staging_blocks", rank) > 0  # the pie ring, on each rank
    return metrics



def signal_mid_stream(server, pid: int, signum: int, read_timeout: float) -> float:
    """Three greedy streams generating, then ``signum`` to ``pid`` (a rank): every stream must end
    with a 503 error event (a stream still open after ``read_timeout`` fails the test). Returns
    when the signal was sent (time.monotonic)."""
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    streams = [EventStream(server, "/v1/completions", body, timeout=read_timeout) for _ in range(3)]
    for stream in streams:
        assert stream.next_event()["choices"]  # generating
    sent = time.monotonic()
    os.kill(pid, signum)
    for stream in streams:
        events = stream.rest()
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503, events[-3:]
    return sent


def test_serve_two_ranks_then_kill_one(tiny_model_dir):
    folder = tiny_model_dir("llama")
    with LLM(str(folder), dtype="float32", device_kv_blocks=256) as llm:
        expected = [output.outputs[0].text for output in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]
    shm_before = shm_entries()
    with running_server(folder, "--dtype", "float32", "--tensor-parallel-size", "2", *SERVE_POOLED) as server:
        for prompt, text in zip(PROMPTS, expected):
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            response = server.request("POST", "/v1/completions", body)
            assert response.status == 200, response.text
            assert response.json()["choices"][0]["text"] == text
        check_rank_metrics(server)
        ranks = rank_pids(server.process.pid)
        assert set(ranks) == {0, 1}, ranks
        workers = [pid for pid in live_pids() if _parent(pid) == str(server.process.pid)]
        killed = signal_mid_stream(server, ranks[1], signal.SIGKILL, read_timeout=30)
        print(f"every caller failed {time.monotonic() - killed:.2f} s after the kill")
        assert server.process.wait(60) != 0
        assert wait_gone(workers, 30) == []  # rank 0, the scheduler and the memory manager too
    assert shm_entries() <= shm_before


def test_serve_two_ranks_then_stop_one(tiny_model_dir, tmp_path, monkeypatch):
    """A hung rank: SIGSTOP rank 1 mid-stream. Rank 0 then waits in a collective for it, so its step
    never returns: its step deadline (--step-timeout) fails it, every caller gets an error, the
    daemon exits non-zero, and the stopped rank is killed with the rest: nothing is left."""
    runtime_parent = tmp_path / "run"  # as under systemd (RuntimeDirectory=): where sockets go
    runtime_parent.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime_parent))
    folder = tiny_model_dir("llama")
    shm_before = shm_entries()
    # The step deadline well below the heartbeat timeout, so that it is what finds the hang, and well
    # above the 2 s after which a silent worker is killed at once; both far above a step of this
    # model (milliseconds), so a busy machine does not trip them.
    flags = ["--dtype", "float32", "--tensor-parallel-size", "2", "--step-timeout", "5", "--heartbeat-timeout", "60"]
    with running_server(folder, *flags) as server:
        ranks = rank_pids(server.process.pid)
        assert set(ranks) == {0, 1}, ranks
        workers = [pid for pid in live_pids() if _parent(pid) == str(server.process.pid)]
        try:
            stopped = signal_mid_stream(server, ranks[1], signal.SIGSTOP, read_timeout=60)
            print(f"every caller failed {time.monotonic() - stopped:.2f} s after the stop")
            assert server.process.wait(60) != 0
            print(f"the daemon exited {time.monotonic() - stopped:.2f} s after the stop")
            log = server.log()
            # Rank 0's deadline found it (not the stopped rank's missing heartbeats); the silent
            # rank was killed at once, so the others had their time to stop cleanly.
            assert "--step-timeout" in log and "executor-1 (pid" in log and "is silent; killing it" in log, log[-3000:]
            assert "did not stop in time" not in log, log[-3000:]
            assert wait_gone(workers, 30) == []  # the stopped rank too
        finally:
            if ranks.get(1) and _parent(ranks[1]):  # never leave a stopped process behind a failed assertion
                os.kill(ranks[1], signal.SIGCONT)
    assert list(runtime_parent.iterdir()) == [], "the runtime directory was not removed"
    assert shm_entries() <= shm_before
