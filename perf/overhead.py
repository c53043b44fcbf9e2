"""Per decode step, the share of time not spent in the model forward, through the engine as
production runs it: its actors in worker processes (``--workers threads``: as threads of this
process, as ``pied.LLM`` runs them). The JSON says which (``"workers"``).

``overhead = 1 - Σ forward / Σ cycle`` over decode steps, where ``forward`` is the executor's
``StepResult.forward_time`` and ``cycle`` the step's wall time as the scheduler sees it (schedule,
StepPlan out, executor inputs + forward + sampling, StepResult back, postprocess, deltas out).
``outside_executor`` is the part outside the executor's own handling of the plan (scheduling,
messaging, (de)serialisation): ``1 - Σ StepResult.step_time / Σ cycle``.

The time totals come from the scheduler's Stats (``cycle_seconds_total``, ``forward_seconds_total``,
``step_seconds_total``), read once the engine is idle (``Engine.wait_idle``); the single prefill step
is removed by subtracting a run with ``max_tokens=1`` (prefill only) from one with
``max_tokens=1+decode_steps``.

Model: SmolLM-135M-shaped with random weights (hidden 576, intermediate 1536, 30 layers, 9 heads,
3 KV heads, vocab 49152), float32 on CPU unless a GPU is present. Prints one JSON line.

    .venv/bin/python perf/overhead.py [--decode-steps 64] [--batch-sizes 1,32] [--workers processes|threads]
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

from common import SMOLLM_135M_SHAPE, add_workers_arg, started_engine  # noqa: E402  (perf/ is on sys.path)

import proto  # noqa: E402
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


async def measure(config: EngineConfig, workers: str, batch_sizes: list[int], decode_steps: int) -> dict[str, dict]:
    async with started_engine(config, workers) as engine:
        log(f"engine ready (workers as {workers})")

        async def run(batch: list[proto.AddRequest]) -> np.ndarray:
            streams = [engine.add_request(request) for request in batch]
            for stream in streams:
                async for _ in stream:
                    pass
            stats = await engine.wait_idle()
            return np.array(
                [stats.cycle_seconds_total, stats.forward_seconds_total, stats.step_seconds_total, stats.num_steps]
            )

        results = {}
        for batch_size in batch_sizes:
            before = await run(requests(batch_size, 8, f"warmup{batch_size}"))
            # A batch's requests reach the scheduler one message at a time, so its prefill may take
            # one step or two; a pair whose prefills differ does not subtract to the decode steps.
            for attempt in range(5):
                middle = await run(requests(batch_size, 1, f"prefill{batch_size}-{attempt}"))
                prefill = middle - before
                before = await run(requests(batch_size, 1 + decode_steps, f"measure{batch_size}-{attempt}"))
                decode = before - middle - prefill
                if round(decode[3]) == decode_steps:
                    break
            assert round(decode[3]) == decode_steps, (decode[3], decode_steps)
            results[str(batch_size)] = summary(decode[0], decode[1], decode[2], int(round(decode[3])))
            log(f"{workers}, batch {batch_size}: {results[str(batch_size)]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--device", default="auto")
    add_workers_arg(parser)
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
        results = asyncio.run(measure(config, args.workers, batch_sizes, args.decode_steps))

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
                "workers": args.workers,
                "batches": results,
                "target": {
                    "batch": int(largest),
                    "max_overhead": 0.05,
                    "met": bool(results[largest]["overhead"] <= 0.05),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
