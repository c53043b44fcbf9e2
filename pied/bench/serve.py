"""One benchmark run: send a request stream to an OpenAI-compatible server (pied, vLLM, SGLang)
and measure it. Settings and result keys follow ``vllm bench serve`` (the command line is in
``command.py``). Requests arrive as a Poisson process at ``request_rate`` (gamma gaps when
``burstiness`` is not 1), each streamed with usage. The Python API is :func:`run_benchmark`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import numpy as np

from pied.bench.client import CHAT_COMPLETIONS, COMPLETIONS, ENDPOINTS, request_body, send_request
from pied.bench.datasets import SampleRequest, Vocabulary, sample_prefix, sample_random, sample_sharegpt
from pied.bench.metrics import (
    METRICS,
    RequestOutput,
    calculate_metrics,
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
