"""Tensor parallelism's cost: decode throughput at TP=1 and TP=2 through the engine's worker processes,
and the all-reduce time of one decode step at TP=2. Prints one JSON line.

    python perf/tp.py [--quick] [--batch 8 --max-tokens 64 --repeats 3]

Decode throughput: ``pied.LLM(tensor_parallel_size=N)`` (one executor process per rank, gloo on
CPU, nccl on CUDA), a batch of short prompts generating ``--max-tokens`` each; TP=1 and TP=2 runs are
interleaved ``--repeats`` times and reported as median and spread. On a CPU the ranks share the same
cores, so TP=2 shows the communication cost, not a speed-up (set ``OMP_NUM_THREADS=1`` to give
every rank one thread; unset, TP=1 uses every core and each rank its share); on a multi-GPU machine
(each rank on ``cuda:r``, run by ``perf/gpu_check.sh`` when it sees two GPUs) it shows the speed-up.

All-reduce time: the collectives one decode step of this model makes at TP=2 (the embedding's and
each layer's two all-reduces of ``[batch, hidden]``, and the logits gather to rank 0), timed in two
processes joined the way the executors are (same backend, same tensor sizes), median per step.

Per rank at TP=2: each rank's mean step and forward time and its step count, from the engine's
``Stats.ranks`` (``/metrics``' ``pied:rank_*`` series).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import emit, machine, random_prompts

# Llama-shaped, with heads that split over 2 ranks (SmolLM-135M's 9 heads do not).
SHAPE = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    initializer_range=0.02,
)
QUICK_SHAPE = dict(SHAPE, num_hidden_layers=4, vocab_size=8192)


def model_folder(shape: dict) -> Path:
    from tiny_models import build_model_dir

    name = f"pied-perf-tp-{shape['num_hidden_layers']}x{shape['hidden_size']}-{shape['vocab_size']}"
    folder = Path(tempfile.gettempdir()) / name
    if not (folder / "config.json").exists():
        build_model_dir(folder, "llama", vocab_size=shape["vocab_size"], **{k: v for k, v in shape.items() if k != "vocab_size"})
    return folder


def decode_throughput(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from pied import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    return sum(len(output.outputs[0].token_ids) for output in outputs) / elapsed


def _collectives_rank(rank: int, size: int, port: int, shape: dict, batch: int, steps: int, results) -> None:
    import torch
    import torch.distributed as dist

    device_type = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= size else "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=size)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    hidden = torch.randn(batch, shape["hidden_size"], device=device)
    logits = torch.randn(batch, shape["vocab_size"] // size, device=device)
    parts = [torch.empty_like(logits) for _ in range(size)] if rank == 0 else None
    times = []
    for step in range(steps + 3):  # 3 warm-up steps
        dist.barrier()
        start = time.perf_counter()
        for _ in range(1 + 2 * shape["num_hidden_layers"]):  # embedding, then o_proj and down_proj per layer
            dist.all_reduce(hidden)
        dist.gather(logits, parts, dst=0)
        if device_type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)
    if rank == 0:
        results.put((device_type, statistics.median(times)))
    dist.destroy_process_group()


def step_collective_time(shape: dict, batch: int, steps: int) -> tuple[str, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_collectives_rank, args=(rank, 2, port, shape, batch, steps, results)) for rank in range(2)
    ]
    for process in processes:
        process.start()
    device_type, seconds = results.get(timeout=300)
    for process in processes:
        process.join(60)
    return device_type, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 4-layer model, fewer tokens (CI, GPU check)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = QUICK_SHAPE if args.quick else SHAPE
    max_tokens = 16 if args.quick else args.max_tokens
    repeats = 2 if args.quick else args.repeats
    from pied import LLM, SamplingParams

    folder = model_folder(shape)
    prompts = random_prompts(args.batch, args.prompt_len, shape["vocab_size"])
    engines = {size: LLM(str(folder), dtype="float32", tensor_parallel_size=size, workers="processes") for size in (1, 2)}
    throughput: dict[int, list[float]] = {1: [], 2: []}
    try:
        for llm in engines.values():  # warm-up
            llm.generate([{"prompt_token_ids": p[:8]} for p in prompts[:2]], SamplingParams(max_tokens=2))
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
            for size, llm in engines.items():
                throughput[size].append(decode_throughput(llm, prompts, max_tokens))
        # Each rank's own mean step and forward times at TP=2 (Stats.ranks, what /metrics exports
        # as pied:rank_*): on a shared CPU the ranks wait on each other in the collectives, so the
        # slower one shows as the other's longer forward.
        ranks = engines[2].engine.stats().ranks
    finally:
        for llm in engines.values():
            llm.shutdown()
    device_type, collective_seconds = step_collective_time(shape, args.batch, 10 if args.quick else 50)
    medians = {size: statistics.median(values) for size, values in throughput.items()}
    emit(
        {
            "benchmark": "tp",
            "model": f"Llama-shaped (random) {shape}",
            "batch": args.batch,
            "max_tokens": max_tokens,
            "repeats": repeats,
            "tok_per_s_tp1": round(medians[1], 1),
            "tok_per_s_tp2": round(medians[2], 1),
            "tok_per_s_tp1_runs": [round(value, 1) for value in throughput[1]],
            "tok_per_s_tp2_runs": [round(value, 1) for value in throughput[2]],
            "tp2_over_tp1": round(medians[2] / medians[1], 3),
            "collectives_device": device_type,
            # Threads per executor: unset, TP=1 uses every core and each TP=2 rank half of them.
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "allreduce_ms_per_step_tp2": round(collective_seconds * 1e3, 3),
            "num_allreduces_per_step": 1 + 2 * shape["num_hidden_layers"],
            "tp2_step_ms_by_rank": [round(r.step_seconds_total / max(r.num_steps, 1) * 1e3, 3) for r in ranks],
            "tp2_forward_ms_by_rank": [round(r.forward_seconds_total / max(r.num_steps, 1) * 1e3, 3) for r in ranks],
            "tp2_steps_by_rank": [r.num_steps for r in ranks],
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
