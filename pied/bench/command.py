"""The ``pied bench serve`` command: flags (``vllm bench serve``'s names), the human table, the
JSON result file. The run itself is :func:`pied.bench.serve.run_benchmark`.

    pied bench serve --base-url http://127.0.0.1:8000 [--model NAME] \\
        [--endpoint /v1/completions | /v1/chat/completions] \\
        [--dataset random | prefix | sharegpt FILE] [--num-prompts N] \\
        [--request-rate R (inf: all at once)] [--burstiness B] [--max-concurrency C] \\
        [--goodput ttft:MS tpot:MS] [--result-file out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from pied.bench.client import COMPLETIONS, ENDPOINTS
from pied.bench.metrics import (
    METRIC_NAMES,
    METRICS,
    parse_goodput,
    parse_metric_list,
    parse_percentiles,
    percentile_label,
)
from pied.bench.serve import BenchmarkConfig, run_benchmark
from proto.config import ConfigError


def format_table(result: dict[str, Any], config: BenchmarkConfig) -> str:
    """The human summary, laid out like vLLM's."""
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        shown = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40}{shown:<10}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if config.max_concurrency is not None:
        row("Maximum request concurrency:", config.max_concurrency)
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if "request_goodput" in result:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    for metric in config.percentile_metrics:
        lines.append("{s:{c}^50}".format(s=METRIC_NAMES[metric], c="-"))
        upper = metric.upper()
        row(f"Mean {upper} (ms):", result[f"mean_{metric}_ms"])
        row(f"Median {upper} (ms):", result[f"median_{metric}_ms"])
        for percentile in config.metric_percentiles:
            label = percentile_label(percentile)
            row(f"{label.upper()} {upper} (ms):", result[f"{label}_{metric}_ms"])
    lines.append("=" * 50)
    if result.get("first_error"):
        lines.append(f"First error: {result['first_error']}")
    return "\n".join(lines)


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """``pied bench serve ...``."""
    bench = subparsers.add_parser("bench", help="benchmark a running OpenAI-compatible server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    parser = kinds.add_parser(
        "serve",
        help="load a server with a request stream and report latency and throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    parser.add_argument("--endpoint", default=COMPLETIONS, choices=ENDPOINTS)
    parser.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    data = parser.add_argument_group("request stream")
    data.add_argument(
        "--dataset",
        "--dataset-name",
        dest="dataset",
        nargs="+",
        default=["random"],
        metavar="NAME [FILE]",
        help="random, prefix, or sharegpt FILE (or sharegpt with --dataset-path FILE)",
    )
    data.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file (--dataset sharegpt)")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument(
        "--tokenizer", default=None, help="a local tokenizer.json (or a model folder) for exact lengths"
    )
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in mean*(1±r)")
    data.add_argument(
        "--sharegpt-output-len", type=int, default=None, help="max_tokens instead of the reply's length"
    )
    data.add_argument("--prefix-system-len", type=int, default=256, help="the shared system prompt's tokens")
    data.add_argument("--prefix-num-turns", type=int, default=4, help="turns per conversation")
    data.add_argument("--prefix-turn-len", type=int, default=32, help="tokens per user turn")
    data.add_argument("--prefix-output-len", type=int, default=32, help="tokens per reply")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--num-warmups", type=int, default=0, help="requests sent before the clock starts")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--ignore-eos", action="store_true", help="generate max_tokens tokens every time")
    sampling.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    report = parser.add_argument_group("report")
    report.add_argument(
        "--percentile-metrics", default=",".join(METRICS), help="comma list of ttft,tpot,itl,e2el"
    )
    report.add_argument("--metric-percentiles", default="99", help="comma list, e.g. 50,90,99")
    report.add_argument(
        "--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50"
    )
    report.add_argument(
        "--slo-ttft", type=float, default=None, metavar="MS", help="same as --goodput ttft:MS"
    )
    report.add_argument(
        "--slo-tpot", type=float, default=None, metavar="MS", help="same as --goodput tpot:MS"
    )
    report.add_argument("--result-file", default=None, help="write the JSON result here")
    report.add_argument("--save-detailed", action="store_true", help="per-request lists in the JSON too")
    report.add_argument("--disable-tqdm", "--no-progress", dest="show_progress", action="store_false")
    parser.set_defaults(handler=cmd_bench_serve)


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    goodput = parse_goodput(args.goodput)
    goodput.update(
        parse_goodput(
            [
                f"{name}:{value}"
                for name, value in (("ttft", args.slo_ttft), ("tpot", args.slo_tpot))
                if value is not None
            ]
        )
    )
    extra_body: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra_body = json.loads(args.extra_body)
        except json.JSONDecodeError as error:
            raise ValueError(f"--extra-body: not JSON ({error})") from None
        if not isinstance(extra_body, dict):
            raise ValueError("--extra-body must be a JSON object")
    dataset, dataset_path = args.dataset[0], args.dataset_path
    if len(args.dataset) == 2 and dataset == "sharegpt" and dataset_path is None:
        dataset_path = args.dataset[1]
    elif len(args.dataset) != 1:
        raise ValueError(f"--dataset: expected random, prefix or sharegpt FILE, got {' '.join(args.dataset)}")
    names = {item.name for item in dataclasses.fields(BenchmarkConfig)}
    values = {name: value for name, value in vars(args).items() if name in names}
    values.update(
        dataset=dataset,
        dataset_path=dataset_path,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        percentile_metrics=tuple(parse_metric_list(args.percentile_metrics)),
        metric_percentiles=tuple(parse_percentiles(args.metric_percentiles)),
        goodput=goodput,
        extra_body=extra_body,
    )
    return BenchmarkConfig(**values).validate()


def cmd_bench_serve(args: argparse.Namespace) -> int:
    # A bad flag is a configuration error (exit 2, one line), like the daemon's own flags.
    try:
        config = config_from_args(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.dataset_path and not Path(config.dataset_path).is_file():
        raise ConfigError(f"--dataset-path: no file at {config.dataset_path}")
    result = asyncio.run(run_benchmark(config))
    document = result.to_json(detailed=args.save_detailed)
    print(format_table(document, config), flush=True)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(document, indent=1) + "\n")
    # Every request failing is a failed benchmark; some failing is a measurement (counted above).
    return 1 if document["completed"] == 0 else 0
