"""Offline generation throughput: pied vs transformers' generate on the same random SmolLM-135M-shaped
model, same prompts, side by side in one run. Prints one JSON line.

    python perf/engine_throughput.py [--num-prompts 16 --prompt-len 64 --max-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import emit, machine, random_prompts, smollm_shaped_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both engines")
    args = parser.parse_args()
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
