"""Per decode step, the share of time not spent in the model forward: in-process vs worker processes.

``overhead = 1 - Σ forward / Σ step`` over decode steps, where ``forward`` is the executor's
``StepResult.forward_time`` and ``step`` the step's wall time as the scheduler sees it (schedule,
StepPlan out, executor inputs + forward + sampling, StepResult back, postprocess, deltas out).
``outside_executor`` is the part outside the executor's own handling of the plan (scheduling,
messaging, (de)serialisation): ``1 - Σ StepResult.step_time / Σ step``.

In-process drives the Scheduler and ModelRunner in one loop, as ``pied.inproc.EngineCore`` does.
Processes use ``ProcessEngineClient``; its scheduler's Stats carry the time totals, read while the
engine is idle (a snapshot is always sent on going idle), and the single prefill step is removed by
subtracting a run with ``max_tokens=1`` (prefill only) from one with ``max_tokens=1+decode_steps``.

Model: SmolLM-135M-shaped with random weights (hidden 576, intermediate 1536, 30 layers, 9 heads,
3 KV heads, vocab 49152), float32 on CPU unless a GPU is present. Prints one JSON line.

    .venv/bin/python perf/overhead.py [--decode-steps 64] [--batch-sizes 1,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from common import SMOLLM_135M_SHAPE  # noqa: E402  (perf/ is on sys.path: scripts run from it)

import proto  # noqa: E402
from pied.mp_client import ProcessEngineClient  # noqa: E402
from proto.config import EngineConfig  # noqa: E402

SEED = 0
PROMPT_LEN = 32
STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr; stdout carries only the JSON line."""
    print(f"[overhead {time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def prompts(batch_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Token ids above the tokenizer's specials; the model's vocabulary is larger than the tokenizer's.
    return [rng.integers(5, SMOLLM_135M_SHAPE["vocab_size"], PROMPT_LEN).tolist() for _ in range(batch_size)]


def requests(batch_size: int, max_tokens: int, tag: str) -> list[proto.AddRequest]:
    params = proto.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [
        proto.AddRequest(f"{tag}-{i}", proto.pack_i32(prompt), params)
        for i, prompt in enumerate(prompts(batch_size, SEED + batch_size))
    ]


def summary(step: float, forward: float, execute: float, num_steps: int) -> dict[str, float]:
    step, forward, execute = float(step), float(forward), float(execute)
    return {
        "steps": int(num_steps),
        "step_ms": round(1e3 * step / num_steps, 3),
        "forward_ms": round(1e3 * forward / num_steps, 3),
        "non_forward_ms": round(1e3 * (step - forward) / num_steps, 3),
        "overhead": round(1 - forward / step, 4),
        "outside_executor": round(1 - execute / step, 4),
    }


# -------------------------------------------------------------------- in-process


def measure_inproc(config: EngineConfig, batch_sizes: list[int], decode_steps: int) -> dict[str, dict]:
    from workers.executor.runner import ModelRunner
    from workers.scheduler.scheduler import Scheduler

    runner = ModelRunner(config)
    model = runner.model_config
    max_model_len = min(config.max_model_len or model.max_position_embeddings, model.max_position_embeddings)
    scheduler = Scheduler(config, runner.num_device_blocks, set(model.eos_token_ids), max_model_len)

    def run(batch: list[proto.AddRequest]) -> list[tuple[float, float, float, int]]:
        for request in batch:
            scheduler.add_request(request)
        steps = []
        while scheduler.has_unfinished():
            started = time.perf_counter()
            plan = scheduler.schedule()
            assert plan is not None
            result = runner.execute(plan)
            scheduler.postprocess(plan, result)
            num_new_tokens = int(proto.unpack_i32(plan.num_scheduled_tokens).sum())
            steps.append(
                (time.perf_counter() - started, result.forward_time, result.step_time, num_new_tokens)
            )
        return steps

    results = {}
    for batch_size in batch_sizes:
        run(requests(batch_size, 8, "warmup"))
        steps = run(requests(batch_size, 1 + decode_steps, "measure"))
        decode = [s for s in steps if s[3] == batch_size]  # one new token per request: decode only
        assert len(decode) == decode_steps, (len(decode), decode_steps)
        results[str(batch_size)] = summary(
            sum(s[0] for s in decode), sum(s[1] for s in decode), sum(s[2] for s in decode), len(decode)
        )
        log(f"in-process, batch {batch_size}: {results[str(batch_size)]}")
    return results


# -------------------------------------------------------------------- worker processes


async def measure_processes(
    config: EngineConfig, batch_sizes: list[int], decode_steps: int
) -> dict[str, dict]:
    client = ProcessEngineClient(config)
    await client.start()
    log("worker processes ready")

    async def run(batch: list[proto.AddRequest]) -> proto.Stats:
        streams = [client.add_request(request) for request in batch]
        for stream in streams:
            async for _ in stream:
                pass
        # The scheduler sends a fresh snapshot whenever it goes idle; wait for it.
        while client.last_stats.num_running or client.last_stats.num_waiting:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        return client.last_stats

    def totals(stats: proto.Stats) -> np.ndarray:
        return np.array(
            [stats.step_time_sum, stats.forward_time_sum, stats.execute_time_sum, stats.num_steps]
        )

    results = {}
    try:
        for batch_size in batch_sizes:
            await run(requests(batch_size, 8, f"warmup{batch_size}"))
            before = totals(client.last_stats)
            prefill = totals(await run(requests(batch_size, 1, f"prefill{batch_size}"))) - before
            middle = totals(client.last_stats)
            full = totals(await run(requests(batch_size, 1 + decode_steps, f"measure{batch_size}"))) - middle
            decode = full - prefill
            assert round(decode[3]) == decode_steps, (decode[3], decode_steps)
            results[str(batch_size)] = summary(decode[0], decode[1], decode[2], int(round(decode[3])))
            log(f"processes, batch {batch_size}: {results[str(batch_size)]}")
    finally:
        await client.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import torch
    from tiny_models import build_model_dir

    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory(prefix="pied-overhead-") as folder:
        model_dir = build_model_dir(
            Path(folder) / "smollm-135m-shaped", "llama", seed=SEED, **SMOLLM_135M_SHAPE
        )
        config = EngineConfig(
            model=str(model_dir),
            device=args.device,
            seed=SEED,
            max_model_len=PROMPT_LEN + args.decode_steps + 16,
            device_kv_blocks=max(batch_sizes) * ((PROMPT_LEN + args.decode_steps + 16) // 16 + 1),
        ).validate()
        log("model built")
        inproc = measure_inproc(config, batch_sizes, args.decode_steps)
        processes = asyncio.run(measure_processes(config, batch_sizes, args.decode_steps))

    largest = str(max(batch_sizes))
    print(
        json.dumps(
            {
                "benchmark": "overhead",
                "model": "SmolLM-135M-shaped, random weights",
                "device": config.resolved_device(),
                "dtype": "float32",  # the checkpoint's, which dtype=auto keeps
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "prompt_len": PROMPT_LEN,
                "decode_steps": args.decode_steps,
                "seed": SEED,
                "inproc": inproc,
                "processes": processes,
                # The cost of the process boundary, per decode step.
                "process_minus_inproc_ms": {
                    b: round(processes[b]["non_forward_ms"] - inproc[b]["non_forward_ms"], 3) for b in inproc
                },
                "target": {
                    "batch": int(largest),
                    "max_overhead": 0.05,
                    "met": bool(processes[largest]["overhead"] <= 0.05),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
