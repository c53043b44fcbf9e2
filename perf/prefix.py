"""Prefix caching on a multi-turn chat workload, through the engine as production runs it (worker
processes; ``--workers threads`` as an option, and the JSON says which), three ways side by side on
the same request stream and the same small device KV pool:

- ``off``: no prefix caching (every round prefills the whole conversation again);
- ``device``: prefix caching on the device tier only (kv_policy none);
- ``host``: prefix caching with the host tier behind it (kv_policy pie, fixed lease): blocks the
  device must evict are demoted to host memory and a later round streams them back.

Workload (fixed seed): one shared system prompt; several users, each in a closed loop of rounds; a
round's prompt is the previous round's prompt and answer plus a new user turn, so every round after
the first repeats the whole conversation so far. Users start a little apart so that the system prompt
can be shared. Prints one JSON line:

    python perf/prefix.py [--quick] [--workers processes|threads]

Fields per run: time to first token p50/p99 (seconds, from each round's submission), throughput
(generated tokens/s over the run), ``computed_tokens`` (tokens the model ran: prefill and decode),
prefix cache hits in tokens per tier, demotions; and the ratios off/device and off/host for TTFT p50
and for computed tokens. Absolute times are for the machine in ``machine``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SMOLLM_135M_SHAPE, add_workers_arg, emit, machine, started_engine, warm_up

import proto
from proto.config import EngineConfig


def conversations(
    num_users: int, num_rounds: int, system_len: int, turn_len: int, vocab: int, seed: int = 0
) -> tuple[list[int], list[list[list[int]]]]:
    """The system prompt and each user's new turns (the answers come from the model as it runs)."""
    rng = np.random.default_rng(seed)
    system = [1] + rng.integers(5, vocab, size=system_len - 1).tolist()
    turns = [
        [rng.integers(5, vocab, size=turn_len).tolist() for _ in range(num_rounds)] for _ in range(num_users)
    ]
    return system, turns


def run(model_dir: str, workload: dict, block_size: int, workers: str, **overrides) -> dict:
    return asyncio.run(run_users(model_dir, workload, block_size, workers, **overrides))


async def run_users(model_dir: str, workload: dict, block_size: int, workers: str, **overrides) -> dict:
    config = EngineConfig(model=model_dir, dtype="float32", block_size=block_size, **overrides)
    system, turns = workload["system"], workload["turns"]
    max_tokens, user_gap = workload["max_tokens"], workload["user_gap"]
    params = proto.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    submitted: dict[str, float] = {}
    first_token: dict[str, float] = {}
    answers: dict[str, list[int]] = {}
    async with started_engine(config, workers) as engine:
        # Warm-up outside the clock, on tokens no conversation uses (so it caches nothing they hit).
        await warm_up(engine, [2] * 8)
        before = engine.stats()
        start = time.perf_counter()

        async def user(index: int) -> None:
            """A closed loop of rounds: each round's prompt is the conversation so far plus a new turn."""
            history = list(system)
            await asyncio.sleep(index * user_gap)
            for round_index, turn in enumerate(turns[index]):
                request_id = f"u{index}r{round_index}"
                history += turn
                submitted[request_id] = time.perf_counter() - start
                answer = answers[request_id] = []
                add = proto.AddRequest(request_id, proto.pack_i32(history), params)
                async for delta in engine.add_request(add):
                    tokens = proto.unpack_i32(delta.token_ids).tolist()
                    if tokens and request_id not in first_token:
                        first_token[request_id] = time.perf_counter() - start
                    answer += tokens
                history += answer

        await asyncio.gather(*(user(index) for index in range(len(turns))))
        elapsed = time.perf_counter() - start
        stats = await engine.wait_idle()
    ttft = np.array([first_token[request_id] - submitted[request_id] for request_id in submitted])

    def delta(field: str) -> int:
        return getattr(stats, field) - getattr(before, field)

    result = dict(
        ttft_p50=float(np.percentile(ttft, 50)),
        ttft_p99=float(np.percentile(ttft, 99)),
        throughput=sum(len(answer) for answer in answers.values()) / elapsed,
        elapsed=elapsed,
        computed_tokens=delta("num_computed_tokens_total"),
        query_tokens=delta("prefix_cache_queries_total"),
        device_hit_tokens=delta("prefix_cache_device_hits_total"),
        host_hit_tokens=delta("prefix_cache_host_hits_total"),
        demotions=delta("prefix_cache_demotions_total"),
        promotions=delta("prefix_cache_promotions_total"),
        preemptions=delta("num_preemptions"),
        bytes_to_device=delta("bytes_to_device_total"),
        # Every run must see the same answers: greedy tokens do not depend on caching.
        answers_digest=hash(tuple(tuple(answers[request_id]) for request_id in sorted(answers))) & 0xFFFFFFFF,
    )
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a smaller model and workload (well under 90 s on two CPU cores)"
    )
    add_workers_arg(parser)
    args = parser.parse_args()

    from tiny_models import build_model_dir

    block_size = 16
    if args.quick:
        model_dir = Path(tempfile.gettempdir()) / "pied-perf-prefix-quick"
        shape = dict(SMOLLM_135M_SHAPE, num_hidden_layers=4, vocab_size=8192)
        num_users, num_rounds, system_len, turn_len, max_tokens = 10, 5, 192, 32, 16
        device_blocks, host_blocks, user_gap = 48, 512, 0.02
    else:
        model_dir = Path(tempfile.gettempdir()) / "pied-perf-prefix"
        shape = dict(SMOLLM_135M_SHAPE, num_hidden_layers=8, vocab_size=16384)
        num_users, num_rounds, system_len, turn_len, max_tokens = 12, 6, 256, 48, 32
        device_blocks, host_blocks, user_gap = 96, 1024, 0.05
    if not (model_dir / "config.json").exists():
        build_model_dir(model_dir, "llama", **shape)
    system, turns = conversations(num_users, num_rounds, system_len, turn_len, shape["vocab_size"])
    workload = dict(system=system, turns=turns, max_tokens=max_tokens, user_gap=user_gap)
    common = dict(device_kv_blocks=device_blocks, max_num_seqs=num_users)

    runs = {
        "off": run(str(model_dir), workload, block_size, args.workers, enable_prefix_caching=False, **common),
        "device": run(str(model_dir), workload, block_size, args.workers, **common),
        "host": run(
            str(model_dir),
            workload,
            block_size,
            args.workers,
            kv_policy="pie",
            expansion=f"fixed:{host_blocks}",
            **common,
        ),
    }
    digests = {run_result.pop("answers_digest") for run_result in runs.values()}
    final_len = system_len + num_rounds * (turn_len + max_tokens)
    emit(
        {
            "benchmark": "prefix",
            "quick": args.quick,
            "workers": args.workers,
            "block_size": block_size,
            "device_kv_blocks": device_blocks,
            "host_kv_blocks": host_blocks,
            "users": num_users,
            "rounds": num_rounds,
            "system_tokens": system_len,
            "turn_tokens": turn_len,
            "answer_tokens": max_tokens,
            # Blocks all conversations hold at their longest, against the device pool above.
            "working_set_blocks": num_users * -(-final_len // block_size),
            "runs": runs,
            "same_answers": len(digests) == 1,
            "ttft_p50_ratio_off_vs_device": round(runs["off"]["ttft_p50"] / runs["device"]["ttft_p50"], 3),
            "ttft_p50_ratio_off_vs_host": round(runs["off"]["ttft_p50"] / runs["host"]["ttft_p50"], 3),
            "computed_ratio_off_vs_device": round(
                runs["off"]["computed_tokens"] / runs["device"]["computed_tokens"], 3
            ),
            "computed_ratio_off_vs_host": round(
                runs["off"]["computed_tokens"] / runs["host"]["computed_tokens"], 3
            ),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
