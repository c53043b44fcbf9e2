"""Pooling: throughput and latency at one fixed device KV budget that the workload overflows, for
the memory policies side by side on the same request stream (Poisson arrivals, mixed prompt and
output lengths, fixed seed). Prints one JSON line; writes a PNG plot with --plot.

    python perf/pooling.py [--quick] [--workers processes|threads] [--plot docs/pooling.png]

The engine runs as in production: its actors in worker processes (``--workers threads``: as
threads of this process, as ``pied.LLM`` runs them); the JSON says which (``"workers"``). Times
are taken where a client sees them (the frontend), step times and stalls are the executor's.

Fields: per run throughput (generated tokens/s), TTFT/TPOT p50/p99, mean end-to-end latency;
``throughput_ratio_pie_vs_none`` (best N), ``latency_ratio_none_vs_pie`` (mean e2e latency, none over
pie) and ``device_memory_ratio_at_equal_throughput`` (the device budget ``none`` needs to match
pie's throughput, over pie's device budget including its staging pages) — the paper's three
headline figures — and ``throughput_ratio_pie_vs_none_at_equal_device_memory``: pie with its device
blocks plus staging ring equal to ``none``'s device blocks (``pie_equal_*`` runs; the ring the
memory manager commanded in the ``pie_adaptive`` run).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from common import (
    SMOLLM_135M_SHAPE,
    add_workers_arg,
    emit,
    machine,
    one_torch_thread,
    started_engine,
    warm_up,
)

import proto
from pied.engine import Engine
from proto.config import EngineConfig
from workers.memory.manager import kv_layout_for
from workers.model_config import ModelConfig


def workload(num_requests: int, rate: float, prompt_range, output_range, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
    arrivals -= arrivals[0]
    requests = []
    for i in range(num_requests):
        prompt_len = int(rng.integers(*prompt_range))
        requests.append(
            dict(
                id=f"r{i}",
                arrival=float(arrivals[i]),
                prompt=[1] + rng.integers(5, vocab, size=prompt_len - 1).tolist(),
                max_tokens=int(rng.integers(*output_range)),
            )
        )
    return requests


def run(model_dir: str, requests, block_size: int, workers: str, keep_trace: bool = False, **overrides) -> dict:
    """One policy on the request stream, through the engine (its workers as ``workers``)."""
    return asyncio.run(run_stream(model_dir, requests, block_size, workers, keep_trace, **overrides))


async def run_stream(
    model_dir: str, requests, block_size: int, workers: str, keep_trace: bool, **overrides
) -> dict:
    config = EngineConfig(model=model_dir, dtype="float32", block_size=block_size, **overrides)
    async with started_engine(config, workers) as engine:
        await warm_up(engine, requests[0]["prompt"][:8])
        before = engine.stats()
        first_token: dict[str, float] = {}
        finished: dict[str, float] = {}
        counts: dict[str, int] = {}
        start = time.perf_counter()

        async def one(request: dict) -> None:
            await asyncio.sleep(max(0.0, request["arrival"] - (time.perf_counter() - start)))
            params = proto.SamplingParams(temperature=0, max_tokens=request["max_tokens"], ignore_eos=True)
            add = proto.AddRequest(request["id"], proto.pack_i32(request["prompt"]), params)
            request_id = request["id"]
            async for delta in engine.add_request(add):
                now = time.perf_counter() - start
                n = len(delta.token_ids) // 4
                counts[request_id] = counts.get(request_id, 0) + n
                if n and request_id not in first_token:
                    first_token[request_id] = now
                if delta.finish_reason is not None:
                    finished[request_id] = now

        trace: list[tuple] = []
        sampler = asyncio.ensure_future(sample_stats(engine, start, trace)) if keep_trace else None
        rings: list[tuple[int, int]] = []  # the widest ring the executor ran with, and its depth
        watcher = asyncio.ensure_future(widest_ring(engine, rings, config.expansion == "adaptive"))
        await asyncio.gather(*(one(request) for request in requests))
        elapsed = time.perf_counter() - start
        stats = await engine.wait_idle()
        for task in (sampler, watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        info = engine.model_info
        assert info is not None
    arrival = {r["id"]: r["arrival"] for r in requests}
    ttft = np.array([first_token[i] - arrival[i] for i in finished])
    tpot = np.array([(finished[i] - first_token[i]) / (counts[i] - 1) for i in finished if counts[i] > 1])
    e2e = np.array([finished[i] - arrival[i] for i in finished])
    # The staging ring, pie only: (depth + 1) areas (at most L) of M blocks, the widest the executor
    # ran with during the stream (adaptive: what the memory manager commanded; fixed:N: N).
    layers = ModelConfig.from_folder(model_dir).num_layers
    widest = rings[0] if rings else (stats.num_staging_blocks, stats.prefetch_depth)
    staging_blocks = widest[0] if config.kv_policy == "pie" else 0
    depth = widest[1] or config.prefetch_depth
    staging_pages = staging_blocks * min(depth + 1, layers)
    step_seconds = stats.step_seconds_total - before.step_seconds_total
    result = dict(
        throughput=sum(counts.values()) / elapsed,
        ttft_p50=float(np.percentile(ttft, 50)),
        ttft_p99=float(np.percentile(ttft, 99)),
        tpot_p50=float(np.percentile(tpot, 50)) if len(tpot) else 0.0,
        tpot_p99=float(np.percentile(tpot, 99)) if len(tpot) else 0.0,
        e2e_mean=float(e2e.mean()),
        preemptions=stats.num_preemptions - before.num_preemptions,
        steps=stats.num_steps - before.num_steps,
        stall_fraction=(stats.stall_seconds_total - before.stall_seconds_total) / max(step_seconds, 1e-9),
        bytes_to_device=stats.bytes_to_device_total - before.bytes_to_device_total,
        # Device KV budget in blocks-equivalent: device blocks plus staging pages / layers.
        device_budget_blocks=info.num_device_blocks + staging_pages / layers,
        num_device_blocks=info.num_device_blocks,
        staging_blocks=staging_blocks,
        prefetch_depth=depth if staging_blocks else 0,
        link_bandwidth=stats.host_link_bandwidth,
        final_lease=stats.host_lease,
        host_block_bytes=kv_layout_for(config).block_bytes,
    )
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    if keep_trace:
        result["trace"] = trace
    return result


TRACE_INTERVAL = 0.02  # seconds between Stats samples of a trace


async def widest_ring(engine: Engine, rings: list[tuple[int, int]], adaptive: bool) -> None:
    """Keep in ``rings[0]`` the widest (staging blocks, prefetch depth) the executor has run with
    once the memory manager commanded one (adaptive: until then it runs the plan's, the largest
    lease; it narrows again once the engine idles). fixed:N: N."""
    first: int | None = None  # the plan's ring, before any command
    commanded = not adaptive
    while True:
        stats = engine.stats()
        ring = stats.num_staging_blocks
        if ring and first is None:
            first = ring
        commanded = commanded or bool(ring and ring != first)  # the first command changed it
        if ring and commanded and (not rings or ring > rings[0][0]):
            rings[:] = [(ring, stats.prefetch_depth)]
        await asyncio.sleep(TRACE_INTERVAL)


async def sample_stats(engine: Engine, start: float, trace: list) -> None:
    """Append to ``trace`` every TRACE_INTERVAL: (time, lease, stall seconds, step seconds, the
    controller's last decision, steps so far), the seconds being the executor's since the last
    sample, from the Stats snapshots the frontend receives (as /metrics reads them)."""
    last = engine.stats()
    while True:
        await asyncio.sleep(TRACE_INTERVAL)
        stats = engine.stats()
        if stats.num_steps != last.num_steps:
            trace.append(
                (
                    round(time.perf_counter() - start, 4),
                    stats.host_lease,
                    stats.stall_seconds_total - last.stall_seconds_total,
                    stats.step_seconds_total - last.step_seconds_total,
                    stats.host_decision,
                    stats.num_steps,
                )
            )
        last = stats


ADAPTIVE_HOST_GIB = 0.25  # the adaptive run's host budget: its ring starts as wide, then narrows


def equal_memory_runs(
    model_dir: str, requests, block_size: int, workers: str, device_blocks: int
) -> dict[str, dict]:
    """Pie at equal *total* device memory: its device blocks plus its staging pages (in blocks,
    ``R * M / L``, R = 2) equal ``none``'s ``device_blocks``. A ring of M host blocks per step costs
    ``R / L`` of a device block each, so a third to two thirds of the budget spent on the ring buys
    far more host blocks than it takes device blocks; fixed at a lease of M (the ring the memory
    manager would command when M is what the link can stream), and adaptive within the best one."""
    layers = ModelConfig.from_folder(model_dir).num_layers
    areas = min(2, layers)
    runs: dict[str, dict] = {}
    rings = {}
    for share in (1 / 3, 1 / 2, 2 / 3):
        ring = int(share * device_blocks * layers // areas)
        pie_blocks = device_blocks - -(-areas * ring // layers)
        if ring < 1 or pie_blocks < 1:
            continue
        rings[f"pie_equal_fixed_{ring}"] = (ring, pie_blocks)
        runs[f"pie_equal_fixed_{ring}"] = run(
            model_dir, requests, block_size, workers, device_kv_blocks=pie_blocks, kv_policy="pie", expansion=f"fixed:{ring}"
        )
    if not runs:
        return runs
    ring, pie_blocks = rings[max(runs, key=lambda name: runs[name]["throughput"])]
    block_bytes = kv_layout_for(EngineConfig(model=model_dir, dtype="float32", block_size=block_size)).block_bytes
    # A host budget of exactly the ring: the plan's ring is that wide, and the lease and the
    # commanded ring stay within it.
    runs["pie_equal_adaptive"] = run(
        model_dir,
        requests,
        block_size,
        workers,
        device_kv_blocks=pie_blocks,
        kv_policy="pie",
        expansion="adaptive",
        host_kv_gib=(ring + 0.5) * block_bytes / (1 << 30),
    )
    return runs


def workload_model(quick: bool) -> tuple[str, list[dict], int, list[int]]:
    """The model folder, request stream, device budget (blocks) and pie lease sizes of a run."""
    from common import smollm_shaped_model
    from tiny_models import build_model_dir

    if quick:
        import tempfile
        from pathlib import Path

        model_dir = Path(tempfile.gettempdir()) / "pied-perf-quick"
        if not (model_dir / "config.json").exists():
            shape = dict(SMOLLM_135M_SHAPE, num_hidden_layers=8, vocab_size=8192)
            build_model_dir(model_dir, "llama", **shape)
        requests = workload(48, rate=40.0, prompt_range=(32, 160), output_range=(16, 64), vocab=8192)
        return str(model_dir), requests, 24, [48, 96, 192]
    model_dir = smollm_shaped_model()
    requests = workload(96, rate=20.0, prompt_range=(32, 256), output_range=(32, 128), vocab=49152)
    return str(model_dir), requests, 48, [96, 192, 384]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller model and workload (~2 min)")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    parser.add_argument(
        "--only-equal-memory", action="store_true", help="only none and pie at equal total device memory"
    )
    add_workers_arg(parser)
    args = parser.parse_args()
    workers = args.workers
    one_torch_thread()
    block_size = 16
    model_dir, requests, device_blocks, pie_ns = workload_model(args.quick)

    runs: dict[str, dict] = {}
    runs["none"] = run(model_dir, requests, block_size, workers, device_kv_blocks=device_blocks)
    if args.only_equal_memory:
        runs.update(equal_memory_runs(model_dir, requests, block_size, workers, device_blocks))
        equal = [runs[k]["throughput"] for k in runs if k.startswith("pie_equal")]
        emit(
            {
                "benchmark": "pooling_equal_memory",
                "quick": args.quick,
                "workers": workers,
                "device_kv_blocks": device_blocks,
                "runs": runs,
                "throughput_ratio_pie_vs_none_at_equal_device_memory": (
                    round(max(equal) / runs["none"]["throughput"], 3) if equal else None
                ),
                "machine": machine(),
            }
        )
        return
    runs["swap"] = run(
        model_dir, requests, block_size, workers, device_kv_blocks=device_blocks, kv_policy="swap", host_kv_gib=1.0
    )
    for n in pie_ns:
        runs[f"pie_fixed_{n}"] = run(
            model_dir,
            requests,
            block_size,
            workers,
            device_kv_blocks=device_blocks,
            kv_policy="pie",
            expansion=f"fixed:{n}",
        )
    # Adaptive expansion: the controller sizes the lease and the memory manager the staging ring
    # (workers/memory/prefetch.py); its ring is what the equal-memory rows below spend on staging.
    runs["pie_adaptive"] = run(
        model_dir,
        requests,
        block_size,
        workers,
        device_kv_blocks=device_blocks,
        kv_policy="pie",
        expansion="adaptive",
        host_kv_gib=ADAPTIVE_HOST_GIB,
    )
    runs.update(equal_memory_runs(model_dir, requests, block_size, workers, device_blocks))
    best_pie = max(
        (k for k in runs if k.startswith("pie") and not k.startswith("pie_equal")), key=lambda k: runs[k]["throughput"]
    )
    pie = runs[best_pie]
    # The device budget `none` needs to match pie: grow it until its throughput catches up.
    none_curve = [(device_blocks, runs["none"]["throughput"])]
    budget = device_blocks
    while none_curve[-1][1] < pie["throughput"] and budget < device_blocks * 16:
        budget *= 2
        none_curve.append(
            (budget, run(model_dir, requests, block_size, workers, device_kv_blocks=budget)["throughput"])
        )
    matched = next((b for b, t in none_curve if t >= pie["throughput"]), None)
    if matched is not None and len(none_curve) > 1:
        # Interpolate between the last budget below pie's throughput and the first at or above it.
        (b0, t0), (b1, t1) = none_curve[-2], none_curve[-1]
        matched = b0 + (b1 - b0) * (pie["throughput"] - t0) / max(t1 - t0, 1e-9)

    equal = [runs[k]["throughput"] for k in runs if k.startswith("pie_equal")]  # none: its ring left no device block
    result = {
        "benchmark": "pooling",
        "quick": args.quick,
        "workers": workers,
        "device_kv_blocks": device_blocks,
        "block_size": block_size,
        "num_requests": len(requests),
        "runs": runs,
        "best_pie": best_pie,
        "none_budget_curve": none_curve,
        "throughput_ratio_pie_vs_none": round(pie["throughput"] / runs["none"]["throughput"], 3),
        "latency_ratio_none_vs_pie": round(runs["none"]["e2e_mean"] / pie["e2e_mean"], 3),
        "device_memory_ratio_at_equal_throughput": (
            round(matched / pie["device_budget_blocks"], 3) if matched is not None else None
        ),
        # Pie's device blocks plus its staging ring equal none's device blocks.
        "throughput_ratio_pie_vs_none_at_equal_device_memory": (
            round(max(equal) / runs["none"]["throughput"], 3) if equal else None
        ),
        "machine": machine(),
    }
    emit(result)
    if args.plot:
        plot(runs, none_curve, args.plot)


def plot(runs: dict, none_curve, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(runs)
    left.bar(names, [runs[n]["throughput"] for n in names], color="tab:blue")
    left.set_ylabel("generated tokens/s")
    left.set_title("throughput at a fixed device budget")
    left.tick_params(axis="x", rotation=30)
    right.plot([b for b, _ in none_curve], [t for _, t in none_curve], "o-", label="none")
    right.axhline(
        max(runs[n]["throughput"] for n in names if n.startswith("pie")),
        color="tab:orange",
        label="pie (best)",
    )
    right.set_xlabel("device KV blocks (none)")
    right.set_ylabel("generated tokens/s")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
