"""Offline generation throughput: pied vs transformers' generate on the same random SmolLM-135M-shaped
model, same prompts, side by side in one run. Prints one JSON line.

    python perf/engine_throughput.py [--num-prompts 16 --prompt-len 64 --max-tokens 64]

With ``--async-scheduling`` it compares pied with async scheduling off and on instead, both engines
in worker processes as ``pied serve`` runs them, rounds interleaved (``--repeats``): decode tokens/s,
the scheduler's step cycle time and the executor's step time (from the engine's Stats), medians and
the async/sync ratio, with the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time

import torch
from common import (
    emit,
    machine,
    one_torch_thread,
    random_prompts,
    smollm_shaped_model,
    started_engine,
    warm_up,
)

from pied import LLM, SamplingParams


def run_transformers(model_dir, prompts, max_tokens: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    inputs = torch.tensor(prompts)  # equal lengths: no padding needed, a fair batch
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(inputs[:2, :8], max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
        elapsed = time.perf_counter() - start
    generated = (out.shape[1] - inputs.shape[1]) * out.shape[0]
    return generated / elapsed


def run_pied(model_dir, prompts, max_tokens: int) -> float:
    llm = LLM(model=str(model_dir), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p[:8]} for p in prompts[:2]], SamplingParams(max_tokens=2))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


async def run_async_comparison(model_dir, prompts, max_tokens: int, repeats: int) -> dict:
    """Sync and async engines side by side (worker processes), ``repeats`` interleaved rounds each."""
    import proto
    from proto.config import EngineConfig

    params = proto.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rounds: dict[str, list[dict]] = {"sync": [], "async": []}
    tokens: dict[str, list] = {}
    async with contextlib.AsyncExitStack() as stack:
        engines = {}
        for name in rounds:
            config = EngineConfig(model=str(model_dir), dtype="float32", async_scheduling=name == "async")
            engines[name] = await stack.enter_async_context(started_engine(config, "processes"))
            await warm_up(engines[name], prompts[0][:8])
        for repeat in range(repeats):
            for name, engine in engines.items():
                before = await engine.wait_idle()
                start = time.perf_counter()
                streams = [
                    engine.add_request(proto.AddRequest(f"{repeat}-{i}", proto.pack_i32(p), params))
                    for i, p in enumerate(prompts)
                ]
                outputs = await asyncio.gather(*(collect_tokens(stream) for stream in streams))
                elapsed = time.perf_counter() - start
                after = await engine.wait_idle()
                tokens.setdefault(name, outputs)
                num_steps = after.num_steps - before.num_steps
                rounds[name].append(
                    {
                        "tokens_per_s": sum(map(len, outputs)) / elapsed,
                        "cycle_ms": 1e3
                        * (after.cycle_seconds_total - before.cycle_seconds_total)
                        / num_steps,
                        "executor_step_ms": 1e3
                        * (after.step_seconds_total - before.step_seconds_total)
                        / num_steps,
                    }
                )
    result = {
        name: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
        | {
            "tokens_per_s_range": [
                round(min(r["tokens_per_s"] for r in runs), 2),
                round(max(r["tokens_per_s"] for r in runs), 2),
            ]
        }
        for name, runs in rounds.items()
    }
    for name in rounds:
        # The scheduler's cycle beyond the executor's step: per-step work (and IPC) not hidden.
        result[name]["exposed_overhead_ms"] = round(
            result[name]["cycle_ms"] - result[name]["executor_step_ms"], 3
        )
    result["ratio_async_vs_sync_tokens_per_s"] = round(
        result["async"]["tokens_per_s"] / result["sync"]["tokens_per_s"], 3
    )
    result["ratio_async_vs_sync_cycle"] = round(result["async"]["cycle_ms"] / result["sync"]["cycle_ms"], 3)
    result["tokens_identical"] = tokens["async"] == tokens["sync"]
    return result


async def collect_tokens(stream) -> list[int]:
    import proto

    tokens: list[int] = []
    async for delta in stream:
        tokens.extend(proto.unpack_i32(delta.token_ids).tolist())
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both engines")
    parser.add_argument(
        "--async-scheduling",
        action="store_true",
        help="compare pied with async scheduling off and on (worker processes) instead of transformers",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds per engine (--async-scheduling)"
    )
    args = parser.parse_args()
    if args.async_scheduling:
        one_torch_thread()
        torch.manual_seed(0)
        prompts = random_prompts(args.num_prompts, args.prompt_len, 49152)
        result = asyncio.run(
            run_async_comparison(smollm_shaped_model(), prompts, args.max_tokens, args.repeats)
        )
        emit(
            {
                "benchmark": "engine_throughput_async_scheduling",
                "model": "SmolLM-135M-shaped (random)",
                "workers": "processes",
                "num_prompts": args.num_prompts,
                "prompt_len": args.prompt_len,
                "max_tokens": args.max_tokens,
                "repeats": args.repeats,
                **result,
                "load_average": os.getloadavg(),
                "machine": machine(),
            }
        )
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = smollm_shaped_model()
    prompts = random_prompts(args.num_prompts, args.prompt_len, 49152)
    hf = run_transformers(model_dir, prompts, args.max_tokens)
    ours = run_pied(model_dir, prompts, args.max_tokens)
    emit(
        {
            "benchmark": "engine_throughput",
            "model": "SmolLM-135M-shaped (random)",
            "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "pied_tokens_per_s": round(ours, 2),
            "transformers_tokens_per_s": round(hf, 2),
            "ratio_pied_vs_transformers": round(ours / hf, 3),
            "threads": args.threads,
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
