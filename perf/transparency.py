"""Is host-resident KV transparent? Decode step time at one batch with 0..100% of its KV on host.

The same decode (``--batch`` sequences at about ``--context`` tokens each) runs with 0%, 25%, 50%,
75% and 100% of its KV blocks in host memory, streamed layer by layer through the staging ring
(DESIGN.md "Streaming").

By default this measures the production path: the engine's scheduler, executor and memory-manager
actors as worker processes (``--workers threads``: as threads of this process, as ``pied.LLM`` runs
them). A fraction is placed on host the way production does it: ``kv_policy=pie`` with a fixed host
lease that holds the whole batch (``expansion=fixed:N``) and a device budget (``device_kv_blocks``)
of ``(1 - fraction)`` of the batch's blocks, so the scheduler puts what does not fit on the device
into host blocks (device first, in admission order: a sequence may be all device, all host or
split; one whose last block is on host also writes its new KV back each step). At 100% one
device block is left (a device budget cannot be empty), so the measured fraction is just under 1. Each fraction needs its own device budget, so each has its own engine; all of them are
started first and then take turns, one batch each per round, so drift on a shared machine hits each
alike. A batch's prompts are ``(ceil(context / 16) - 1) * 16 + 1`` tokens, so the 15 decode tokens
after prefill fit in each sequence's last block and the placement does not change while measuring.
Once every sequence decodes, ``--warm-steps`` steps pass and the next ``--steps`` are measured from
the scheduler's Stats snapshots (about one per step): per-step executor step time (median over the
snapshot intervals), stall and bytes moved, and the achieved host fraction (host blocks in use over
all blocks in use, and bytes streamed per step over the batch's KV bytes).

``--workers runner`` keeps the older measurement: the executor's ModelRunner in this process with
synthetic plans that put exactly the first ``fraction`` of every sequence's blocks on host (at 100%
the tail too, so decode also writes back), every step at position ``context - 1``, plus the raw
host->device bandwidth of one plain copy and the copy engine's efficiency against it, and
``step_cpu_ms`` (CPU time of the stepping thread, which does not grow when other processes share
the cores).

Reported per fraction (all modes): median step and forward time, stall time and ``stall_fraction``
(stall / step), bytes moved per step, the measured host fraction and ``step_time_ratio`` against 0%.
The JSON says which path ran (``"workers"``).

On CPU "device" memory is host memory too: the copy is memory to memory, done by the copy thread on
the same cores and memory bus as compute, so a CPU run leaves one core to it (one torch thread for
the engine, ``--threads`` for the runner) and its step time can grow by the copy's work even at zero
stall. The transparency claim is about the stall, and about GPUs. Prints one JSON line.

    .venv/bin/python perf/transparency.py [--quick] [--workers processes|threads|runner]
        [--batch 32] [--context 512] [--depth 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "perf")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    SMOLLM_135M_SHAPE,
    emit,
    machine,
    one_torch_thread,
    smollm_shaped_model,
    started_engine,
)

import proto  # noqa: E402
from pied.engine import Engine  # noqa: E402
from proto.config import EngineConfig  # noqa: E402
from workers.executor.runner import ModelRunner  # noqa: E402
from workers.memory.host_pool import HostSegment, local_segment_fds  # noqa: E402
from workers.memory.manager import kv_layout_for  # noqa: E402

SEED = 0
BLOCK_SIZE = 16
STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr; stdout carries only the JSON line."""
    print(f"[transparency {time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def decode_plan(
    step_id: int, batch: int, context: int, num_device_blocks: int, fraction: float, first: bool
) -> proto.StepPlan:
    """One decode token per sequence at position ``context - 1``; the first ``fraction`` of each
    sequence's blocks are host blocks, consecutive per sequence."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_host = round(fraction * blocks_per_seq)
    tables = []
    for seq in range(batch):
        host = [num_device_blocks + seq * blocks_per_seq + i for i in range(num_host)]
        device = [seq * blocks_per_seq + i for i in range(num_host, blocks_per_seq)]
        tables.append(host + device)
    request_ids = [f"seq{seq}" for seq in range(batch)]
    params = proto.SamplingParams(temperature=0.0)
    new = [proto.NewRequestData(r, proto.pack_i32([1]), params) for r in request_ids] if first else []
    return proto.StepPlan(
        step_id=step_id,
        request_ids=request_ids,
        num_scheduled_tokens=proto.pack_i32([1] * batch),
        token_ids=proto.pack_i32([(7 * seq + step_id) % 4000 + 5 for seq in range(batch)]),
        start_positions=proto.pack_i32([context - 1] * batch),
        num_blocks=proto.pack_i32([blocks_per_seq] * batch),
        block_tables=proto.pack_i32([b for table in tables for b in table]),
        sample=bytes([1] * batch),
        new_requests=new,
    )


def attach_host_pool(runner: ModelRunner, num_blocks: int) -> list[HostSegment]:
    """Host segments made here as the memory manager would, then mapped (and registered, on CUDA) by the runner."""
    per_segment = runner.host_kv.pool.blocks_per_segment
    segments = [
        HostSegment.create(i, first, min(per_segment, num_blocks - first), runner.kv_layout)
        for i, first in enumerate(range(0, num_blocks, per_segment))
    ]
    runner.attach_host_segments([segment.info for segment in segments], local_segment_fds(segments))
    return segments


def raw_copy_bandwidth(runner: ModelRunner, segment: HostSegment, repeats: int) -> float:
    """Bytes/s of one plain host->device copy of a whole host segment (contiguous pages)."""
    source = segment.tensor
    destination = torch.empty_like(source, device=runner.device)
    cuda = runner.device.type == "cuda"
    timings = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if cuda:
            torch.cuda.synchronize(runner.device)
        start = time.perf_counter()
        destination.copy_(source, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(runner.device)
        timings.append(time.perf_counter() - start)
    nbytes = source.numel() * source.element_size()
    return nbytes / statistics.median(timings[1:])


def summarize(samples: list[dict], baseline_step: float | None, raw_bytes_per_s: float) -> dict:
    def median(key: str) -> float:
        return statistics.median(sample[key] for sample in samples)

    total_step = sum(s["step_time"] for s in samples)
    total_stall = sum(s["stall_time"] for s in samples)
    total_bytes = sum(s["bytes_to_device"] + s["bytes_to_host"] for s in samples)
    total_copy = sum(s["copy_time"] for s in samples)
    achieved = total_bytes / total_copy if total_copy else 0.0
    step = median("step_time")
    return {
        "steps": len(samples),
        "num_host_blocks": samples[0]["num_host_blocks"],
        "step_ms": round(1e3 * step, 2),
        "forward_ms": round(1e3 * median("forward_time"), 2),
        "step_cpu_ms": round(1e3 * median("step_cpu_time"), 2),
        "copy_ms": round(1e3 * median("copy_time"), 2),
        "stall_ms": round(1e3 * median("stall_time"), 2),
        "stall_fraction": round(total_stall / total_step, 4),
        "layer_compute_ms": round(1e3 * median("layer_compute_time"), 3),
        "bytes_to_device_per_step": int(median("bytes_to_device")),
        "bytes_to_host_per_step": int(median("bytes_to_host")),
        "achieved_bytes_per_s": round(achieved),
        "copy_efficiency": round(achieved / raw_bytes_per_s, 3) if achieved else None,
        "prefetched_steps": sum(1 for s in samples if s["num_prefetched_layers"]),
        "step_time_ratio": round(step / baseline_step, 3) if baseline_step else 1.0,
    }


# ---------------------------------------------------------------- through the engine


def quick_model() -> Path:
    """The smaller SmolLM-shaped model of the quick runs (8 layers, 8192-token vocabulary), as
    ``perf/pooling.py --quick`` builds it."""
    from tiny_models import build_model_dir

    base = Path(tempfile.gettempdir()) / "pied-perf-quick"
    if not (base / "config.json").exists():
        build_model_dir(base, "llama", **dict(SMOLLM_135M_SHAPE, num_hidden_layers=8, vocab_size=8192))
    return base


def engine_config(args: argparse.Namespace, model: Path, fraction: int, num_blocks: int) -> EngineConfig:
    """``fraction`` percent of the batch's ``num_blocks`` do not fit on the device and go to the
    host lease, which holds every block (so the lease never limits the placement)."""
    cuda = torch.cuda.is_available()
    device_blocks = max(1, round(num_blocks * (100 - fraction) / 100))
    return EngineConfig(
        model=str(model),
        dtype="bfloat16" if cuda else "float32",
        block_size=BLOCK_SIZE,
        device_kv_blocks=device_blocks,
        kv_policy="pie",
        expansion=f"fixed:{num_blocks + args.batch}",
        prefetch_depth=args.depth,
        # Every prompt in one prefill step (after the first request's, which starts alone), so no
        # sequence decodes far ahead of the others before all of them decode together.
        max_num_batched_tokens=max(2048, args.batch * args.context + args.batch),
        max_num_seqs=max(256, args.batch),
        # Fresh prompts each round; cached blocks of earlier rounds would only add demotion copies.
        enable_prefix_caching=False,
        seed=SEED,
    )


def batch_requests(
    args: argparse.Namespace, prompt_len: int, vocab: int, tag: str, seed: int
) -> list[proto.AddRequest]:
    """``--batch`` random prompts of ``prompt_len`` tokens, each decoding until the last slot of its
    final block (``max_tokens`` = the slots left in it + 1: the last token is never written)."""
    rng = np.random.default_rng(seed)
    max_tokens = BLOCK_SIZE - (prompt_len - 1) % BLOCK_SIZE
    params = proto.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [
        proto.AddRequest(
            f"{tag}-{i}", proto.pack_i32([1] + rng.integers(5, vocab, prompt_len - 1).tolist()), params
        )
        for i in range(args.batch)
    ]


async def measure_batch(
    engine: Engine, requests: list[proto.AddRequest], warm_steps: int, steps: int
) -> list[dict]:
    """Run one batch; once every sequence has its first token, skip ``warm_steps`` steps and return
    one sample per Stats interval over the next ``steps`` steps (the snapshot after the interval:
    its usage is the placement being measured)."""
    started = [0]

    async def consume(request: proto.AddRequest) -> None:
        first = True
        async for delta in engine.add_request(request):
            if first and delta.token_ids:
                started[0] += 1
                first = False

    consumers = asyncio.gather(*(consume(request) for request in requests))
    samples: list[dict] = []
    try:
        deadline = time.monotonic() + 600
        while started[0] < len(requests):
            if consumers.done() or time.monotonic() > deadline:
                consumers.result()  # raises what ended it early
                raise RuntimeError(f"only {started[0]} of {len(requests)} sequences started decoding")
            await asyncio.sleep(0.01)  # Stats arrive every 50 ms at most
        first_step = engine.stats().num_steps + warm_steps
        last = None
        while not consumers.done():
            stats = engine.stats()
            if last is None and stats.num_steps >= first_step:
                last = stats
            elif last is not None and stats.num_steps > last.num_steps:
                samples.append(sample_between(last, stats))
                last = stats
                if sum(s["steps"] for s in samples) >= steps:
                    break
            await asyncio.sleep(0.01)  # Stats arrive every 50 ms at most
        await consumers
    finally:
        if not consumers.done():
            consumers.cancel()
            await asyncio.gather(consumers, return_exceptions=True)
    await engine.wait_idle(timeout=120)
    return samples


def sample_between(before: proto.Stats, after: proto.Stats) -> dict:
    num_steps = after.num_steps - before.num_steps
    return {
        "steps": num_steps,
        "step_time": (after.step_seconds_total - before.step_seconds_total) / num_steps,
        "forward_time": (after.forward_seconds_total - before.forward_seconds_total) / num_steps,
        "stall_time": (after.stall_seconds_total - before.stall_seconds_total) / num_steps,
        "bytes_to_device": (after.bytes_to_device_total - before.bytes_to_device_total) / num_steps,
        "bytes_to_host": (after.bytes_to_host_total - before.bytes_to_host_total) / num_steps,
        "device_usage": after.device_usage,
        "host_usage": after.host_usage,
        "host_lease": after.host_lease,
        "running": after.num_running,
    }


def summarize_engine(
    samples: list[dict], num_device_blocks: int, batch_bytes: int, baseline_step: float | None
) -> dict:
    """Per fraction: medians over the snapshot intervals, sums for the stall fraction."""
    if not samples:
        return {"steps": 0}

    def median(key: str) -> float:
        return statistics.median(sample[key] for sample in samples)

    num_steps = sum(s["steps"] for s in samples)
    total_step = sum(s["step_time"] * s["steps"] for s in samples)
    total_stall = sum(s["stall_time"] * s["steps"] for s in samples)
    host_blocks = median("host_usage") * statistics.median(s["host_lease"] for s in samples)
    device_blocks = median("device_usage") * num_device_blocks
    step = median("step_time")
    return {
        "steps": num_steps,
        "intervals": len(samples),
        "num_device_blocks": num_device_blocks,
        "num_host_blocks_in_use": round(host_blocks),
        "host_fraction": round(host_blocks / max(host_blocks + device_blocks, 1e-9), 4),
        "host_fraction_bytes": round(median("bytes_to_device") / batch_bytes, 4),
        "step_ms": round(1e3 * step, 2),
        "forward_ms": round(1e3 * median("forward_time"), 2),
        "stall_ms": round(1e3 * median("stall_time"), 2),
        "stall_fraction": round(total_stall / total_step, 4) if total_step else 0.0,
        "bytes_to_device_per_step": int(median("bytes_to_device")),
        "bytes_to_host_per_step": int(median("bytes_to_host")),
        "step_time_ratio": round(step / baseline_step, 3) if baseline_step else 1.0,
    }


async def measure_engines(args: argparse.Namespace, fractions: list[int], model: Path) -> dict:
    """One engine per fraction, all started first, then one batch each per round, round-robin."""
    blocks_per_seq = -(-args.context // BLOCK_SIZE)
    prompt_len = (blocks_per_seq - 1) * BLOCK_SIZE + 1
    num_blocks = args.batch * blocks_per_seq
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    samples: dict[int, list[dict]] = {fraction: [] for fraction in fractions}
    async with contextlib.AsyncExitStack() as stack:
        engines: dict[int, Engine] = {}
        for fraction in fractions:
            config = engine_config(args, model, fraction, num_blocks)
            engines[fraction] = await stack.enter_async_context(started_engine(config, args.workers))
            info = engines[fraction].model_info
            assert info is not None
            log(f"{fraction}%: engine ready ({info.num_device_blocks} device blocks, {args.workers})")
        block_bytes = kv_layout_for(engines[fractions[0]].config).block_bytes
        for round_index in range(args.rounds + 1):  # round 0 warms every engine up
            for fraction in fractions:
                requests = batch_requests(
                    args,
                    prompt_len,
                    vocab,
                    f"r{round_index}f{fraction}",
                    SEED + 1000 * round_index + fraction,
                )
                batch_samples = await measure_batch(engines[fraction], requests, args.warm_steps, args.steps)
                if round_index > 0:
                    samples[fraction].extend(batch_samples)
            log(f"round {round_index}/{args.rounds} done" + (" (warm-up)" if round_index == 0 else ""))
        device_blocks = {
            fraction: engine.model_info.num_device_blocks  # type: ignore[union-attr]
            for fraction, engine in engines.items()
        }
    baseline = (
        statistics.median(s["step_time"] for s in samples[fractions[0]])
        if fractions[0] == 0 and samples[fractions[0]]
        else None
    )
    return {
        "prompt_len": prompt_len,
        "num_blocks": num_blocks,
        "block_bytes": block_bytes,
        "results": {
            str(fraction): summarize_engine(
                samples[fraction], device_blocks[fraction], num_blocks * block_bytes, baseline
            )
            for fraction in fractions
        },
    }


def run_engine(args: argparse.Namespace, fractions: list[int]) -> None:
    """The production path (``--workers processes`` or ``threads``)."""
    one_torch_thread()
    torch.manual_seed(SEED)
    model = quick_model() if args.quick else smollm_shaped_model()
    log(f"model at {model}")
    measured = asyncio.run(measure_engines(args, fractions, model))
    emit(
        {
            "benchmark": "transparency",
            "workers": args.workers,
            "quick": args.quick,
            "model": "SmolLM-135M-shaped (random weights)" + (", 8 layers, vocab 8192" if args.quick else ""),
            "dtype": "bfloat16" if torch.cuda.is_available() else "float32",
            "batch": args.batch,
            "context": args.context,
            "block_size": BLOCK_SIZE,
            "prefetch_depth": args.depth,
            "rounds": args.rounds,
            "warm_steps": args.warm_steps,
            **measured,
            "machine": machine()
            | {"torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
            "seconds": round(time.monotonic() - STARTED, 1),
        }
    )


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers",
        choices=("processes", "threads", "runner"),
        default="processes",
        help="the engine's actors as worker processes, as the daemon runs them (default), or as "
        "threads of this process, as pied.LLM does; or 'runner': the executor's ModelRunner alone, "
        "with synthetic plans",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--fractions", default="0,25,50,75,100", help="percent of KV blocks on host")
    parser.add_argument("--depth", type=int, default=1, help="prefetch depth (R = depth + 1 staging areas)")
    parser.add_argument("--rounds", type=int, default=4, help="round-robin passes over the fractions")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per fraction and round")
    parser.add_argument(
        "--warm-steps", type=int, default=2, help="engine: decode steps skipped once every sequence decodes"
    )
    parser.add_argument("--no-prefetch-next-step", action="store_true", help="runner only")
    parser.add_argument(
        "--threads", type=int, default=None, help="runner: torch CPU threads (default: cores - 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds of few steps; engine: batch 8, context 256, 8 layers"
    )
    args = parser.parse_args()
    engine = args.workers != "runner"
    if args.quick:
        args.rounds = 2
        args.steps = 6 if engine else 2
        if engine:
            args.batch, args.context = 8, 256
    if args.steps is None:
        args.steps = 10 if engine else 4
    fractions = [int(f) for f in args.fractions.split(",")]
    if any(not 0 <= f <= 100 for f in fractions) or args.batch < 1 or args.context < 2:
        parser.error("--fractions must be percentages in [0, 100], --batch >= 1, --context >= 2.")
    if engine and args.warm_steps + args.steps > BLOCK_SIZE - 2:
        parser.error(
            f"--warm-steps + --steps must be at most {BLOCK_SIZE - 2}: a batch decodes within its last block."
        )
    if engine:
        run_engine(args, fractions)
    else:
        run_runner(args, fractions)


def run_runner(args: argparse.Namespace, fractions: list[int]) -> None:
    """The executor's ModelRunner in this process with synthetic plans (``--workers runner``)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    torch.manual_seed(SEED)

    path = smollm_shaped_model()
    log(f"model at {path}")
    blocks_per_seq = -(-args.context // BLOCK_SIZE)
    num_blocks = args.batch * blocks_per_seq
    cuda = torch.cuda.is_available()
    config = EngineConfig(
        model=str(path),
        dtype="bfloat16" if cuda else "float32",
        block_size=BLOCK_SIZE,
        device_kv_blocks=num_blocks,
        prefetch_depth=args.depth,
        seed=SEED,
    )
    runner = ModelRunner(
        config, num_staging_blocks=num_blocks, prefetch_next_step=not args.no_prefetch_next_step
    )
    segments = attach_host_pool(runner, num_blocks)
    layout = runner.kv_layout
    log(
        f"runner on {runner.device}: {num_blocks} device + {num_blocks} host blocks, {layout.page_bytes} B pages"
    )
    raw = raw_copy_bandwidth(runner, segments[0], repeats=5)
    log(f"raw host->device copy: {raw / 1e9:.2f} GB/s")

    samples: dict[int, list[dict]] = {fraction: [] for fraction in fractions}
    step_id = 0
    for round_index in range(args.rounds):
        for fraction in fractions:
            for measured in [False] + [True] * args.steps:  # one warm-up step after each switch
                plan = decode_plan(
                    step_id, args.batch, args.context, num_blocks, fraction / 100, step_id == 0
                )
                cpu_start = time.thread_time()
                result = runner.execute(plan)
                step_cpu = time.thread_time() - cpu_start
                step_id += 1
                if measured and (round_index > 0 or args.rounds == 1):  # round 0 warms everything up
                    samples[fraction].append(
                        {
                            "step_time": result.step_time,
                            "step_cpu_time": step_cpu,
                            "forward_time": result.forward_time,
                            "stall_time": result.stall_time,
                            "layer_compute_time": result.layer_compute_time,
                            "bytes_to_device": result.bytes_to_device,
                            "bytes_to_host": result.bytes_to_host,
                            "num_host_blocks": result.num_host_blocks,
                            "copy_time": runner.stream_stats.copy_time,
                            "num_prefetched_layers": runner.stream_stats.num_prefetched_layers,
                        }
                    )
        log(f"round {round_index + 1}/{args.rounds} done")

    baseline = statistics.median(s["step_time"] for s in samples[fractions[0]]) if fractions[0] == 0 else None
    results = {str(fraction): summarize(samples[fraction], baseline, raw) for fraction in fractions}
    runner.close()
    for segment in segments:
        segment.close()
    emit(
        {
            "benchmark": "transparency",
            "workers": "runner",
            "model": "SmolLM-135M-shaped (random weights)",
            "dtype": config.dtype,
            "batch": args.batch,
            "context": args.context,
            "block_size": BLOCK_SIZE,
            "prefetch_depth": args.depth,
            "prefetch_next_step": not args.no_prefetch_next_step,
            "page_bytes": layout.page_bytes,
            "raw_copy_bytes_per_s": round(raw),
            "results": results,
            "machine": machine()
            | {"torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
            "seconds": round(time.monotonic() - STARTED, 1),
        }
    )


if __name__ == "__main__":
    main()
