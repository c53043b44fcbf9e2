"""Is host-resident KV transparent? Decode step time at one batch with 0..100% of its KV on host.

The same decode step (``--batch`` sequences at ``--context`` tokens each) runs with 0%, 25%, 50%,
75% and 100% of its KV blocks in host memory, streamed layer by layer through the staging ring
(DESIGN.md "Streaming"). Each sequence's first blocks go to host, its tail stays on device (at 100%
the tail too, so decode also writes back). Host blocks are consecutive per sequence, as a fresh
allocator hands them out, so each layer's copy is a few large transfers.

Reported per fraction: median step and forward time, stall time and ``stall_fraction`` (stall /
step), bytes moved, the copy engine's achieved bandwidth (bytes / its busy time) against the raw
host->device bandwidth of one plain copy of a host segment measured in the same run
(``copy_efficiency``), and ``step_time_ratio`` against 0%. ``step_cpu_ms`` is the CPU time of the
thread that runs the step: unlike wall time it does not grow when other processes share the cores.

On CPU "device" memory is host memory too: the copy is memory to memory, done by the copy thread on
the same cores and memory bus as compute, so a CPU run leaves one core to it (``--threads``, default
cores - 1, as a GPU has its own copy engine) and its step time can grow by the copy's work even at
zero stall. The transparency claim is about the stall, and about GPUs.

KV content does not change the work, so the pool is not prefilled: every step is the same decode at
position ``context - 1`` (which also lets the next-step prefetch work, as in steady-state decode).
Fractions run round-robin, so drift on a shared machine hits each alike. Prints one JSON line.

Unlike the other benchmarks this one drives the executor's ModelRunner in this process, with
synthetic plans: what it measures (the layer pipeline's stalls at a chosen host fraction) lives
entirely in the runner, and no scheduler or controller could place exactly that fraction on host.
The JSON says so (``"workers": "runner"``).

    .venv/bin/python perf/transparency.py [--quick] [--batch 32] [--context 512] [--depth 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "perf")]

import torch  # noqa: E402
from common import emit, machine, smollm_shaped_model  # noqa: E402

import proto  # noqa: E402
from proto.config import EngineConfig  # noqa: E402
from workers.executor.runner import ModelRunner  # noqa: E402
from workers.memory.host_pool import HostSegment  # noqa: E402

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
    """Host segments made here as the memory manager would, then mapped (and pinned) by the runner."""
    per_segment = runner.host_kv.pool.blocks_per_segment
    segments = [
        HostSegment.create(i, first, min(per_segment, num_blocks - first), runner.kv_layout)
        for i, first in enumerate(range(0, num_blocks, per_segment))
    ]
    runner.attach_host_segments([segment.info for segment in segments])
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--fractions", default="0,25,50,75,100", help="percent of KV blocks on host")
    parser.add_argument("--depth", type=int, default=1, help="prefetch depth (R = depth + 1 staging areas)")
    parser.add_argument("--rounds", type=int, default=4, help="round-robin passes over the fractions")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per fraction and round")
    parser.add_argument("--no-prefetch-next-step", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores - 1)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 steps (under a minute)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 2
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    torch.manual_seed(SEED)
    fractions = [int(f) for f in args.fractions.split(",")]

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
