"""What structured output costs the sampler: one decode step's ``Sampler.sample`` for a batch of
greedy requests, plain vs every row under a JSON-schema grammar (xgrammar bitmask filled per row
and applied to the logits), plus the grammar's compile time. Fixed seed, warm-up, median of
repeated interleaved runs. Prints one JSON line.

    python perf/structured_output.py [--vocab 8192] [--batch 16] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, machine
from tiny_models import EOS, tokenizer_json

import proto
from workers.executor.sampler import Sampler, SamplingState
from workers.grammar import GrammarCompiler

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "tags"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    (folder / "tokenizer.json").write_text(tokenizer_json(args.vocab))
    compiler = GrammarCompiler(folder, args.vocab, {EOS})
    constraint = proto.GrammarConstraint(proto.GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    start = time.perf_counter()
    compiler.matcher(constraint)  # the first compile builds the tokenizer info too
    first_compile = time.perf_counter() - start
    start = time.perf_counter()
    compiler.matcher(constraint)  # cached
    cached_compile = time.perf_counter() - start

    sampler = Sampler(args.vocab, "cpu")
    prompt = np.array([5, 6, 7], dtype=np.int32)

    def run(constrained: bool) -> float:
        params = proto.SamplingParams(temperature=0.0, grammar=constraint if constrained else None, ignore_eos=True)
        states = [SamplingState(params, prompt, args.vocab, {EOS}, "cpu", compiler) for _ in range(args.batch)]
        logits = torch.randn(args.steps, args.batch, args.vocab)
        elapsed = 0.0
        for step in range(args.steps):
            start = time.perf_counter()
            ids, _ = sampler.sample(logits[step], states)
            for state, token in zip(states, ids.tolist()):
                state.append(token)
            elapsed += time.perf_counter() - start
        return elapsed / args.steps

    run(False), run(True)  # warm-up
    plain, constrained = [], []
    for _ in range(args.repeats):
        plain.append(run(False))
        constrained.append(run(True))
    plain_ms = statistics.median(plain) * 1e3
    constrained_ms = statistics.median(constrained) * 1e3
    emit(
        {
            "benchmark": "structured_output",
            "vocab": args.vocab,
            "batch": args.batch,
            "sample_ms_plain": round(plain_ms, 3),
            "sample_ms_json_schema": round(constrained_ms, 3),
            "mask_ms_per_row": round((constrained_ms - plain_ms) / args.batch, 4),
            "spread_ms_json_schema": [round(min(constrained) * 1e3, 3), round(max(constrained) * 1e3, 3)],
            "first_compile_s": round(first_compile, 3),
            "cached_compile_s": round(cached_compile, 4),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
