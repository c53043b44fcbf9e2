"""``pied bench serve``: load an OpenAI-compatible server (pied, vLLM, SGLang) and measure it.

    pied bench serve --base-url http://127.0.0.1:8000 --model NAME \\
        [--endpoint /v1/completions | /v1/chat/completions] \\
        [--dataset random | sharegpt --dataset-path FILE | prefix] [--num-prompts N] \\
        [--request-rate R (inf: all at once)] [--burstiness B] [--max-concurrency C] \\
        [--goodput ttft:MS tpot:MS] [--result-file out.json]

Flags and result keys follow ``vllm bench serve``. Requests arrive as a Poisson process at
``--request-rate`` (gamma intervals when ``--burstiness`` is not 1), each streamed with usage; the
benchmark prints a table and writes one JSON object. The Python API is :func:`run_benchmark`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from pied.bench.client import CHAT_COMPLETIONS, COMPLETIONS, ENDPOINTS, request_body, send_request
from pied.bench.datasets import SampleRequest, Vocabulary, sample_prefix, sample_random, sample_sharegpt
from pied.bench.metrics import (
    METRIC_NAMES,
    METRICS,
    RequestOutput,
    calculate_metrics,
    parse_goodput,
    parse_metric_list,
    parse_percentiles,
    percentile_label,
)
from workers.progress import Progress

DATASETS = ("random", "sharegpt", "prefix")
REQUEST_TIMEOUT_SECONDS = 6 * 3600  # vLLM's: a request may queue behind a long run


@dataclass
class BenchmarkConfig:
    """Everything one benchmark run needs; the CLI flags map one to one onto these fields."""

    base_url: str
    model: str | None = None  # None: the first model the server lists at /v1/models
    endpoint: str = COMPLETIONS
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False
    api_key: str | None = None
    tokenizer: str | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    prefix_system_len: int = 256
    prefix_num_turns: int = 4
    prefix_turn_len: int = 32
    prefix_output_len: int = 32
    percentile_metrics: tuple[str, ...] = METRICS
    metric_percentiles: tuple[float, ...] = (99.0,)
    goodput: dict[str, float] = field(default_factory=dict)
    num_warmups: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True  # drawn only on a terminal in any case
    # A ready request stream (a perf script's own); when set the dataset fields are not used.
    requests: list[SampleRequest] | None = None

    def validate(self) -> BenchmarkConfig:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "sharegpt" and not self.dataset_path and self.requests is None:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE (the ShareGPT JSON)")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if not self.request_rate > 0:
            raise ValueError(
                f"--request-rate must be positive (inf for all at once), got {self.request_rate}"
            )
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be positive, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if "://" not in self.base_url:
            raise ValueError(f"--base-url must look like http://HOST:PORT, got {self.base_url!r}")
        for metric in self.percentile_metrics:
            if metric not in METRICS:
                raise ValueError(f"unknown percentile metric {metric!r} (one of {', '.join(METRICS)})")
        return self

    @property
    def root(self) -> str:
        # Accept the OpenAI-style base URL (".../v1") as well as the server's root.
        return self.base_url.rstrip("/").removesuffix("/v1")

    @property
    def url(self) -> str:
        return self.root + self.endpoint


@dataclass
class BenchmarkResult:
    """``metrics``: the aggregate keys (see :func:`calculate_metrics`); ``outputs``: per request,
    in the stream's order; ``config``: what ran."""

    config: BenchmarkConfig
    metrics: dict[str, Any]
    outputs: list[RequestOutput]
    date: str

    @property
    def first_error(self) -> str | None:
        return next((output.error for output in self.outputs if not output.success), None)

    def to_json(self, detailed: bool = False) -> dict[str, Any]:
        """The ``--result-file`` object: run description, aggregate metrics, first error; with
        ``detailed`` the per-request lists too (``input_lens``, ``output_lens``, ``ttfts``, ``itls``,
        ``errors``, ``generated_texts``) as vLLM writes them."""
        config = self.config
        result: dict[str, Any] = {
            "date": self.date,
            "backend": "openai-chat" if config.endpoint == CHAT_COMPLETIONS else "openai",
            "base_url": config.base_url,
            "endpoint": config.endpoint,
            "model_id": config.model,
            "dataset": config.dataset if config.requests is None else "custom",
            "num_prompts": len(self.outputs),
            "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
            "burstiness": config.burstiness,
            "max_concurrency": config.max_concurrency,
            "seed": config.seed,
            "goodput_slos_ms": config.goodput or None,
            **self.metrics,
            "first_error": self.first_error,
        }
        if detailed:
            result.update(
                input_lens=[output.prompt_len for output in self.outputs],
                output_lens=[output.output_tokens for output in self.outputs],
                ttfts=[output.ttft for output in self.outputs],
                itls=[output.itl for output in self.outputs],
                errors=[output.error for output in self.outputs],
                generated_texts=[output.generated_text for output in self.outputs],
            )
        return result


def build_requests(config: BenchmarkConfig) -> list[SampleRequest]:
    if config.requests is not None:
        return list(config.requests)
    vocabulary = Vocabulary(config.tokenizer)
    if config.dataset == "random":
        return sample_random(
            config.num_prompts,
            config.random_input_len,
            config.random_output_len,
            config.random_range_ratio,
            config.seed,
            vocabulary,
        )
    if config.dataset == "sharegpt":
        assert config.dataset_path is not None  # validate() checked
        return sample_sharegpt(
            config.dataset_path, config.num_prompts, config.sharegpt_output_len, config.seed, vocabulary
        )
    return sample_prefix(
        config.num_prompts,
        config.prefix_system_len,
        config.prefix_num_turns,
        config.prefix_turn_len,
        config.prefix_output_len,
        config.seed,
        vocabulary,
    )


def arrival_gaps(num_requests: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds between consecutive arrivals: gamma-distributed with mean ``1 / rate`` and shape
    ``burstiness`` (exponential, so Poisson arrivals, at 1; burstier below 1, steadier above);
    zeros at rate inf (every request at once)."""
    if math.isinf(rate):
        return np.zeros(num_requests)
    rng = np.random.default_rng([seed, 1])  # its own stream: the prompts do not shift the gaps
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=num_requests)


async def arrivals(
    requests: list[SampleRequest], rate: float, burstiness: float, seed: int
) -> AsyncIterator[tuple[int, SampleRequest]]:
    """Yield ``(index, request)`` at each request's arrival time (the first at once). Times are
    kept against one clock, so the time spent sending does not stretch the gaps."""
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    gaps[0] = 0.0
    due = time.perf_counter() + np.cumsum(gaps)
    for index, request in enumerate(requests):
        delay = due[index] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield index, request


async def served_model(session: aiohttp.ClientSession, root: str, headers: dict[str, str]) -> str:
    """The first model id the server lists (what ``vllm bench serve`` does without ``--model``)."""
    try:
        async with session.get(root + "/v1/models", headers=headers) as response:
            if response.status != 200:
                raise ValueError(f"GET {root}/v1/models: HTTP {response.status}; pass --model")
            models = (await response.json()).get("data") or []
    except aiohttp.ClientError as error:
        raise ValueError(f"GET {root}/v1/models failed ({error}); is the server up?") from None
    if not models:
        raise ValueError(f"{root}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


async def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Send the configured stream to the server and measure it (see the module doc)."""
    config.validate()
    requests = build_requests(config)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=True) as session:
        model = config.model or await served_model(session, config.root, headers)
        config = dataclasses.replace(config, model=model)  # the result names the model that ran

        def body(request: SampleRequest) -> dict[str, Any]:
            return request_body(
                config.endpoint, model, request, config.temperature, config.ignore_eos, config.extra_body
            )

        for _ in range(config.num_warmups):  # outside the clock, one at a time
            await send_request(session, config.url, body(requests[0]), headers)
        semaphore = asyncio.Semaphore(config.max_concurrency or len(requests))
        outputs: list[RequestOutput] = [RequestOutput() for _ in requests]
        progress = Progress(len(requests), "requests", stream=sys.stderr)
        # A bar is drawn only when both streams are terminals: a redirected stdout means a log.
        progress.enabled = progress.enabled and config.show_progress and sys.stdout.isatty()

        async def one(index: int, request: SampleRequest) -> None:
            async with semaphore:
                outputs[index] = await send_request(session, config.url, body(request), headers)
            progress.update()

        started = time.perf_counter()
        tasks = []
        async for index, request in arrivals(requests, config.request_rate, config.burstiness, config.seed):
            tasks.append(asyncio.create_task(one(index, request)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        progress.close()
    metrics = calculate_metrics(
        outputs, duration, config.percentile_metrics, config.metric_percentiles, config.goodput
    )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return BenchmarkResult(config, metrics, outputs, date)


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


# ---------------------------------------------------------------- command line


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
    config = config_from_args(args)
    if config.dataset_path and not Path(config.dataset_path).is_file():
        raise FileNotFoundError(f"--dataset-path: no file at {config.dataset_path}")
    result = asyncio.run(run_benchmark(config))
    document = result.to_json(detailed=args.save_detailed)
    print(format_table(document, config), flush=True)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(document, indent=1) + "\n")
    # Every request failing is a failed benchmark; some failing is a measurement (counted above).
    return 1 if document["completed"] == 0 else 0
