"""The memory policies side by side through the daemon a user runs: each configuration is a real
``pied serve`` (worker processes, HTTP on loopback) measured by ``pied bench serve``'s client
(:func:`pied.bench.serve.run_benchmark`) on the same request stream (same seed, same arrivals).
Prints one JSON line:

    python perf/serving.py [--quick] [--workload pooling,adaptive,prefix] [--repeats N]

Workloads:

- ``pooling``: random token-id prompts at Poisson arrivals that overflow a small device KV pool;
  ``none`` (device only), ``swap``, ``pie`` with a fixed lease and ``pie`` adaptive.
- ``adaptive``: the pooling stream on a copy engine throttled so that large static leases stall
  (the CPU copy thread's test-only throttle, ``$PIED_COPY_THROTTLE_BYTES_PER_S``, inherited by the
  workers): ``pie`` with a sweep of fixed leases and ``pie`` adaptive with the sweep's largest lease
  as its budget; the ratio is adaptive over the best fixed lease.
- ``prefix``: multi-turn conversations sharing one system prompt (``--dataset prefix``), on a small
  device pool: prefix caching ``off``, on the ``device`` tier only, and with the ``host`` tier
  (pie) behind it.

With ``--repeats N`` the configurations of a workload run interleaved (A, B, C, A, B, C ...) and
every figure is the median of its runs with its min and max (``perf/spread.py``), so a slow spell
of a shared machine lands on every configuration rather than on one. Figures are the client's
(TTFT, TPOT, ITL, end-to-end latency, output tokens/s, from the streamed responses) plus the
server's own counters from ``/metrics`` (preemptions, prefix-cache hits).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import SMOLLM_135M_SHAPE, emit, machine
from server import start_server
from spread import aggregate

from pied.bench.datasets import SampleRequest, Vocabulary, sample_prefix

THROTTLED_LINK = 0.25e9  # bytes/s of the adaptive workload's copy engine, as perf/adaptive.py's
CLIENT_FIGURES = (
    "output_throughput",
    "request_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "mean_e2el_ms",
    "completed",
    "failed",
    "total_output_tokens",
)
# Server counters read from /metrics before and after a run (their growth is the run's).
SERVER_COUNTERS = {
    "preemptions": "num_preemptions",
    "prefix_hit_tokens": "prefix_cache_hits",
    "prefix_query_tokens": "prefix_cache_queries",
}


@dataclass(frozen=True)
class Workload:
    name: str
    model_shape: dict[str, Any]
    requests: Callable[[Path], list[SampleRequest]]
    request_rate: float
    configs: dict[str, tuple[str, ...]]  # name -> pied serve flags
    ratios: dict[str, tuple[str, str, str]]  # name -> (figure, numerator config, denominator config)
    env: dict[str, str] = field(default_factory=dict)  # for the server and its workers
    best_of: tuple[str, ...] = ()  # configs whose best output throughput is the "best" pseudo-config


def random_requests(
    num: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int = 0
):
    """Token-id prompts (exact lengths, no tokenizer in the way), as ``perf/pooling.py`` draws them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num):
        length = int(rng.integers(*prompt_range))
        prompt = [1] + rng.integers(5, vocab, size=length - 1).tolist()
        requests.append(SampleRequest(prompt, [], length, int(rng.integers(*output_range))))
    return requests


def workloads(quick: bool) -> dict[str, Workload]:
    layers, vocab = (8, 8192) if quick else (30, 49152)
    num, rate = (48, 40.0) if quick else (96, 20.0)
    device_blocks = 24 if quick else 48
    pooling = Workload(
        "pooling",
        dict(SMOLLM_135M_SHAPE, num_hidden_layers=layers, vocab_size=vocab),
        lambda _: random_requests(num, (32, 160 if quick else 256), (16, 64) if quick else (32, 128), vocab),
        rate,
        {
            "none": ("--device-kv-blocks", str(device_blocks)),
            "swap": ("--device-kv-blocks", str(device_blocks), "--kv-policy", "swap", "--host-kv-gib", "1"),
            "pie_fixed": (
                "--device-kv-blocks",
                str(device_blocks),
                "--kv-policy",
                "pie",
                "--expansion",
                f"fixed:{4 * device_blocks}",
            ),
            "pie_adaptive": (
                "--device-kv-blocks",
                str(device_blocks),
                "--kv-policy",
                "pie",
                "--expansion",
                "adaptive",
                "--host-kv-gib",
                "1",
            ),
        },  # fmt: skip
        {
            "throughput_ratio_pie_fixed_vs_none": ("output_throughput", "pie_fixed", "none"),
            "throughput_ratio_pie_adaptive_vs_none": ("output_throughput", "pie_adaptive", "none"),
            "latency_ratio_none_vs_pie_fixed": ("mean_e2el_ms", "none", "pie_fixed"),
        },
    )
    # Bytes of one KV block (float32, 16 tokens, every layer) of the SmolLM-shaped model, so the
    # adaptive budget equals the largest fixed lease of the sweep.
    shape = pooling.model_shape
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    block_bytes = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 16 * 4
    sweep = [2 * device_blocks, 4 * device_blocks, 8 * device_blocks, 16 * device_blocks]
    pie = ("--device-kv-blocks", str(device_blocks), "--kv-policy", "pie", "--expansion")
    adaptive = Workload(
        "adaptive",
        pooling.model_shape,
        pooling.requests,
        rate,
        {
            **{f"pie_fixed_{n}": (*pie, f"fixed:{n}") for n in sweep},
            "pie_adaptive": (*pie, "adaptive", "--host-kv-gib", f"{max(sweep) * block_bytes / 2**30:.6f}"),
        },
        {"throughput_ratio_adaptive_vs_best_fixed": ("output_throughput", "pie_adaptive", "best")},
        env={"PIED_COPY_THROTTLE_BYTES_PER_S": str(THROTTLED_LINK)},
        best_of=tuple(f"pie_fixed_{n}" for n in sweep),
    )
    users, turns, system_len, turn_len, answer_len = (10, 5, 192, 32, 16) if quick else (12, 6, 256, 48, 32)
    prefix_device = 48 if quick else 96
    common = ("--device-kv-blocks", str(prefix_device), "--max-num-seqs", str(users))
    prefix = Workload(
        "prefix",
        dict(SMOLLM_135M_SHAPE, num_hidden_layers=4 if quick else 8, vocab_size=8192 if quick else 16384),
        lambda model: sample_prefix(
            users * turns, system_len, turns, turn_len, answer_len, vocabulary=Vocabulary(model)
        ),
        8.0 if quick else 4.0,
        {
            "off": (*common, "--no-enable-prefix-caching"),
            "device": common,
            "host": (*common, "--kv-policy", "pie", "--expansion", f"fixed:{8 * prefix_device}"),
        },
        {
            "ttft_p50_ratio_off_vs_device": ("median_ttft_ms", "off", "device"),
            "ttft_p50_ratio_off_vs_host": ("median_ttft_ms", "off", "host"),
        },
    )
    return {"pooling": pooling, "adaptive": adaptive, "prefix": prefix}


def model_folder(workload: Workload) -> Path:
    from tiny_models import build_model_dir

    shape = workload.model_shape
    folder = (
        Path(tempfile.gettempdir()) / f"pied-perf-serving-{shape['num_hidden_layers']}x{shape['vocab_size']}"
    )
    if not (folder / "config.json").exists():
        build_model_dir(folder, "llama", **shape)
    return folder


def server_counters(server) -> dict[str, float]:
    """The counters of ``SERVER_COUNTERS`` summed over their label sets (``/metrics``)."""
    samples = server.metrics()
    totals = dict.fromkeys(SERVER_COUNTERS, 0.0)
    for key, metric in SERVER_COUNTERS.items():
        for sample, value in samples.items():
            name = sample.split("{", 1)[0]
            if name.split(":")[-1] in (metric, metric + "_total"):
                totals[key] += value
    return totals


def run_one(
    model: Path, flags: tuple[str, ...], requests: list[SampleRequest], rate: float, env: dict[str, str]
) -> dict[str, Any]:
    """One configuration: start ``pied serve`` with ``flags``, warm it up, run the stream, stop it."""
    from pied.bench.serve import BenchmarkConfig, run_benchmark

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # start_server passes this process's environment on
    try:
        server = start_server(model, "--dtype", "float32", "--block-size", "16", *flags, timeout=900)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        config = BenchmarkConfig(
            base_url=server.base_url,
            requests=requests,
            num_prompts=len(requests),
            request_rate=rate,
            seed=0,
            temperature=0.0,
            ignore_eos=True,
            num_warmups=1,
            show_progress=False,
        )
        before = server_counters(server)
        result = asyncio.run(run_benchmark(config))
        after = server_counters(server)
    finally:
        status = server.stop()
    metrics = result.metrics
    figures = {key: metrics[key] for key in CLIENT_FIGURES if key in metrics}
    figures.update({key: after[key] - before[key] for key in SERVER_COUNTERS})
    figures["first_error"] = result.first_error
    figures["server_exit_status"] = status
    return figures


def measure(workload: Workload, repeats: int) -> dict[str, Any]:
    model = model_folder(workload)
    requests = workload.requests(model)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in workload.configs}
    for _ in range(repeats):  # interleaved: A, B, C, A, B, C ...
        for name, flags in workload.configs.items():
            runs[name].append(run_one(model, flags, requests, workload.request_rate, workload.env))
    summary: dict[str, Any] = {
        "requests": len(requests),
        "request_rate": workload.request_rate,
        "configs": {name: " ".join(flags) for name, flags in workload.configs.items()},
        "runs": {name: median_run(results) for name, results in runs.items()},
        "spread": {name: spread_of(results) for name, results in runs.items()} if repeats > 1 else {},
    }
    if workload.best_of:
        # Per round, the best of the static configurations (chosen with hindsight, as a user
        # tuning by hand could at best).
        runs["best"] = [
            max((runs[name][index] for name in workload.best_of), key=lambda run: run["output_throughput"])
            for index in range(repeats)
        ]
    for ratio, (figure, numerator, denominator) in workload.ratios.items():
        values = [
            a[figure] / b[figure]
            for a, b in zip(runs[numerator], runs[denominator], strict=True)
            if b.get(figure)
        ]
        summary[ratio] = round(sorted(values)[len(values) // 2], 3) if values else None
        if repeats > 1 and values:
            summary[ratio + "_range"] = [round(min(values), 3), round(max(values), 3)]
    return summary


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = sorted(result[key] for result in results)
            merged[key] = round(values[len(values) // 2], 4)
        else:
            merged[key] = next((result[key] for result in results if result[key]), value)
    return merged


def spread_of(results: list[dict[str, Any]]) -> dict[str, str]:
    spreads = aggregate(results)
    return {".".join(path): str(spread) for path, spread in spreads.items() if path[0] in CLIENT_FIGURES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller models and streams (a few minutes)")
    parser.add_argument(
        "--workload", default="pooling,adaptive,prefix", help="comma-separated: pooling, adaptive, prefix"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each configuration")
    args = parser.parse_args()
    available = workloads(args.quick)
    chosen = [name.strip() for name in args.workload.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in available]
    if unknown or not chosen:
        parser.error(
            f"--workload: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(available)}"
        )
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    # One compute thread per worker: on a shared 2-core machine more fight the copy thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {name: measure(available[name], args.repeats) for name in chosen}
    emit(
        {
            "benchmark": "serving",
            "quick": args.quick,
            "workers": "processes",
            "client": "pied bench serve",
            "repeats": args.repeats,
            "workloads": result,
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
