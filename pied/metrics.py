"""Prometheus metrics for the API server, through ``prometheus_client`` (the library vLLM uses).

Names are vLLM's ``vllm:*`` metrics with a ``pied:`` prefix, and every series carries a
``model_name`` label (the served model name), so vLLM's dashboards and alerts read pied as they
read vLLM. Each server has its own ``CollectorRegistry`` (never the process-global one): tests run
several servers in one process.

Three sources:

- **Per request**, observed by the API as each engine request (one choice) streams its deltas, so
  ``n`` choices count as ``n`` requests, as in vLLM: token counters, finish reasons, and the
  latency histograms on the frontend's clock (they include the IPC hop): time to first token
  (arrival at the API to first token), inter-token latency (time between deltas, divided among the
  later delta's tokens), end-to-end latency (arrival to the finishing delta).
- **Per request, measured by the scheduler** (``proto.TokenDelta``'s phase timings on its final
  delta): queue time (arrival at the scheduler to first scheduling), prefill time (first scheduling
  to first token), decode time (first token to finish), and their sum as inference time.
- **Engine state**, read from the scheduler's ``proto.Stats`` snapshot at scrape time: the running
  and waiting counts, device KV usage, preemptions, prefix cache totals, tokens per step.

Host memory pooling (DESIGN.md "KV memory", "Adaptive expansion") has series of its own, all named
``pied:host_kv_*`` or ``pied:host_prefix_cache_*`` (plus the streamed bytes and stall seconds, which
only the host tier has): ``pied:kv_cache_usage_perc`` is the device tier alone, as in vLLM, so no
``sum()`` ever adds a host fraction to a device one. ``pied:prefix_cache_hits_total`` counts hits on
both tiers (vLLM's hit rate is hits over queries); ``pied:host_prefix_cache_hits_total`` is the part
found on the host.

Under tensor parallelism the engine-wide executor series (``pied:step_seconds_total``,
``pied:stall_seconds_total``, ``pied:kv_bytes_transferred_total``) are rank 0's, the StepResults the
scheduler waits for, and ``pied:rank_*`` series labelled ``rank`` give every rank's own (from
``proto.Stats.ranks``; absent with one rank): steps, step, forward and stall seconds, bytes each way
and the staging ring. Each rank streams its own slice of the host blocks, so the bytes of all ranks
are ``sum(pied:rank_kv_bytes_transferred_total)``, and the slowest rank's stalls are what the
expansion controller steers by.

Process metrics (``process_*``) are ``prometheus_client``'s, for the API process and each worker
process, labelled ``worker`` (``api`` for this process; with threaded workers there is only it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

import proto

# vLLM turns these off too: a ``*_created`` series per counter and histogram doubles the scrape for
# nothing a dashboard reads. (A process-wide switch; pied's process has no other registry.)
prometheus_client.disable_created_metrics()

# The 0.0.4 text format: what generate_latest writes for names like ours, and what every
# Prometheus version scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
# vLLM's buckets, with finer ones below 10 ms (a decode step of a small model is a few ms).
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")  # the engine's (proto.FinishReason)
MODEL_NAME = "model_name"


def token_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 buckets up to the context length, for the per-request token histograms."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


class RequestTiming:
    """Timestamps of one engine request, as the frontend sees them (``time.monotonic()``)."""

    __slots__ = ("arrival", "first_token", "last_token")

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None


class ServerMetrics:
    """One server's metrics: a registry of its own; ``render(stats, worker_pids)`` is ``/metrics``."""

    def __init__(self, model_name: str, max_model_len: int = 8192) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        labels = [MODEL_NAME]

        def counter(name: str, help_text: str, extra: Iterable[str] = ()) -> Counter:
            return Counter(name, help_text, [*labels, *extra], registry=registry)

        def histogram(name: str, help_text: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, help_text, labels, buckets=tuple(buckets), registry=registry)

        # Children bound once: every series has its model_name from the first scrape (at 0).
        self.prompt_tokens = counter("pied:prompt_tokens", "Number of prefill tokens processed.").labels(
            model_name
        )
        self.generation_tokens = counter(
            "pied:generation_tokens", "Number of generation tokens processed."
        ).labels(model_name)
        self.prompt_tokens_cached = counter(
            "pied:prompt_tokens_cached", "Number of prompt tokens found in the prefix cache (either tier)."
        ).labels(model_name)
        success = counter(
            "pied:request_success", "Count of finished engine requests by finish reason.", ["finished_reason"]
        )
        self.request_success = success
        for reason in FINISH_REASONS:
            success.labels(model_name, reason)
        self.time_to_first_token = histogram(
            "pied:time_to_first_token_seconds",
            "Time from arrival at the API to the first token.",
            TTFT_BUCKETS,
        ).labels(model_name)
        self.inter_token_latency = histogram(
            "pied:inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS
        ).labels(model_name)
        self.time_per_output_token = histogram(
            "pied:request_time_per_output_token_seconds",
            "Decode time of a request divided by its output tokens after the first.",
            ITL_BUCKETS,
        ).labels(model_name)
        self.e2e_request_latency = histogram(
            "pied:e2e_request_latency_seconds",
            "Time from arrival at the API to the last token.",
            REQUEST_BUCKETS,
        ).labels(model_name)
        self.request_queue_time = histogram(
            "pied:request_queue_time_seconds",
            "Time from arrival at the scheduler to the first scheduling (the scheduler's clock).",
            REQUEST_BUCKETS,
        ).labels(model_name)
        self.request_prefill_time = histogram(
            "pied:request_prefill_time_seconds",
            "Time from the first scheduling to the first token (the scheduler's clock).",
            REQUEST_BUCKETS,
        ).labels(model_name)
        self.request_decode_time = histogram(
            "pied:request_decode_time_seconds",
            "Time from the first token to the last (the scheduler's clock).",
            REQUEST_BUCKETS,
        ).labels(model_name)
        self.request_inference_time = histogram(
            "pied:request_inference_time_seconds",
            "Time from the first scheduling to the last token: prefill plus decode.",
            REQUEST_BUCKETS,
        ).labels(model_name)
        self.request_prompt_tokens = histogram(
            "pied:request_prompt_tokens",
            "Number of prompt tokens per finished request.",
            token_buckets(max_model_len),
        ).labels(model_name)
        self.request_generation_tokens = histogram(
            "pied:request_generation_tokens",
            "Number of generated tokens per finished request.",
            token_buckets(max_model_len),
        ).labels(model_name)
        self.engine = EngineCollector(model_name)
        registry.register(self.engine)
        registry.register(WorkerProcessCollector(model_name, self.engine))

    # ---------------------------------------------------------------- per engine request

    def observe_tokens(
        self,
        timing: RequestTiming,
        num_tokens: int,
        num_prompt_tokens: int,
        now: float,
        num_cached_tokens: int = 0,
    ) -> None:
        """A delta with ``num_tokens`` new tokens arrived for the request timed by ``timing``."""
        if num_tokens <= 0:
            return
        self.generation_tokens.inc(num_tokens)
        if timing.first_token is None:
            timing.first_token = now
            self.time_to_first_token.observe(now - timing.arrival)
            self.prompt_tokens.inc(num_prompt_tokens)
            self.prompt_tokens_cached.inc(num_cached_tokens)
            # The first delta's tokens beyond the first were produced by the same steps; no ITL for them.
        else:
            assert timing.last_token is not None
            per_token = (now - timing.last_token) / num_tokens
            for _ in range(num_tokens):
                self.inter_token_latency.observe(per_token)
        timing.last_token = now

    def observe_finish(
        self,
        timing: RequestTiming,
        finish_reason: str,
        now: float,
        num_prompt_tokens: int,
        num_generation_tokens: int,
    ) -> None:
        """The request timed by ``timing`` ended (as the client sees it) with ``finish_reason``."""
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.e2e_request_latency.observe(now - timing.arrival)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)

    def observe_phases(self, phases: proto.RequestPhases, num_generation_tokens: int) -> None:
        """The scheduler's phase timings of a finished request (from its final delta)."""
        self.request_queue_time.observe(phases.queue_seconds)
        self.request_prefill_time.observe(phases.prefill_seconds)
        self.request_decode_time.observe(phases.decode_seconds)
        self.request_inference_time.observe(phases.prefill_seconds + phases.decode_seconds)
        if num_generation_tokens > 1:
            self.time_per_output_token.observe(phases.decode_seconds / (num_generation_tokens - 1))

    # ---------------------------------------------------------------- exposition

    def render(self, stats: proto.Stats, worker_pids: Mapping[str, int] | None = None) -> str:
        """The exposition text, with the engine's series read from ``stats``."""
        self.engine.stats = stats
        self.engine.worker_pids = dict(worker_pids or {})
        return generate_latest(self.registry).decode()


class EngineCollector(Collector):
    """The engine's state as of its last ``proto.Stats`` snapshot, collected at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats = proto.Stats()
        self.worker_pids: dict[str, int] = {}

    def describe(self) -> list[Metric]:
        # Unchecked by the registry (the names are collected fresh on each scrape).
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        name = self.model_name

        def gauge(metric: str, help_text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, help_text, labels=[MODEL_NAME])
            family.add_metric([name], value)
            return family

        def counter(metric: str, help_text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, help_text, labels=[MODEL_NAME])
            family.add_metric([name], value)
            return family

        yield gauge(
            "pied:num_requests_running", "Number of requests in the running batch.", stats.num_running
        )
        yield gauge(
            "pied:num_requests_waiting", "Number of requests waiting to be scheduled.", stats.num_waiting
        )
        yield gauge(
            "pied:kv_cache_usage_perc",
            "Device KV cache usage as a fraction of its blocks (1 means 100 percent).",
            stats.device_usage,
        )
        yield counter("pied:num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions)
        yield counter(
            "pied:prefix_cache_queries",
            "Prefix cache lookups, in tokens: the tokens of each request admitted with prefix caching on.",
            stats.prefix_cache_queries_total,
        )
        yield counter(
            "pied:prefix_cache_hits",
            "Prefix cache hits, in tokens (prefill skipped), on either tier.",
            stats.prefix_cache_device_hits_total + stats.prefix_cache_host_hits_total,
        )
        yield counter(
            "pied:step_seconds",
            "Seconds the executor spent on steps (inputs, forward pass, sampling).",
            stats.step_seconds_total,
        )
        yield self._iteration_tokens(stats)
        # Host memory pooling: series of their own, never a label of a device series.
        yield gauge(
            "pied:host_kv_cache_usage_perc",
            "Host KV cache usage as a fraction of the leased host blocks (1 means 100 percent).",
            stats.host_usage,
        )
        yield gauge("pied:host_kv_blocks_in_use", "Host KV blocks referenced.", stats.num_host_blocks_used)
        yield gauge(
            "pied:host_kv_lease_blocks",
            "Host KV blocks the scheduler may hold (the lease).",
            stats.host_lease,
        )
        yield gauge(
            "pied:host_kv_lease_target_blocks",
            "The expansion controller's estimate of the largest lease whose streaming stays transparent.",
            stats.host_lease_target,
        )
        yield gauge(
            "pied:host_kv_link_bandwidth_bytes_per_second",
            "The expansion controller's host -> device bandwidth estimate (0 while unknown).",
            stats.host_link_bandwidth,
        )
        decision = GaugeMetricFamily(
            "pied:host_kv_controller_decision",
            "The expansion controller's last decision (value 1, labelled with its action and reason).",
            labels=[MODEL_NAME, "action", "reason"],
        )
        if stats.host_decision:
            action, _, reason = stats.host_decision.partition(":")
            decision.add_metric([name, action.strip(), reason.strip()], 1)
        yield decision
        transferred = CounterMetricFamily(
            "pied:kv_bytes_transferred",
            "KV bytes moved between host and device, by direction.",
            labels=[MODEL_NAME, "direction"],
        )
        transferred.add_metric([name, "host_to_device"], stats.bytes_to_device_total)
        transferred.add_metric([name, "device_to_host"], stats.bytes_to_host_total)
        yield transferred
        yield counter(
            "pied:stall_seconds",
            "Seconds compute waited for host KV copies (the stalls).",
            stats.stall_seconds_total,
        )
        yield counter(
            "pied:host_prefix_cache_hits",
            "Prefix cache hits, in tokens, found on the host tier (part of pied:prefix_cache_hits_total).",
            stats.prefix_cache_host_hits_total,
        )
        yield counter(
            "pied:host_prefix_cache_demotions",
            "Cached device blocks kept on the host tier when evicted from the device.",
            stats.prefix_cache_demotions_total,
        )
        yield counter(
            "pied:host_prefix_cache_promotions",
            "Host prefix cache hits copied back to the device rather than streamed.",
            stats.prefix_cache_promotions_total,
        )

        yield from self._ranks(stats.ranks)

    def _ranks(self, ranks: list[proto.RankStats]) -> Iterator[Metric]:
        """Every tensor-parallel rank's own figures (nothing with one rank)."""
        if not ranks:
            return
        labels = [MODEL_NAME, "rank"]
        families = {
            "steps": CounterMetricFamily("pied:rank_steps", "Steps the rank ran.", labels=labels),
            "step_seconds": CounterMetricFamily(
                "pied:rank_step_seconds",
                "Seconds the rank's executor spent on steps (inputs, forward pass, sampling).",
                labels=labels,
            ),
            "forward_seconds": CounterMetricFamily(
                "pied:rank_forward_seconds", "Seconds of the rank's model forward passes.", labels=labels
            ),
            "stall_seconds": CounterMetricFamily(
                "pied:rank_stall_seconds",
                "Seconds the rank's compute waited for its host KV copies (the stalls).",
                labels=labels,
            ),
            "staging_blocks": GaugeMetricFamily(
                "pied:rank_staging_blocks",
                "Host blocks per step the rank's staging ring serves (0: no ring).",
                labels=labels,
            ),
        }
        transferred = CounterMetricFamily(
            "pied:rank_kv_bytes_transferred",
            "KV bytes the rank moved between host and device (its slice of every block), by direction.",
            labels=[*labels, "direction"],
        )
        for totals in ranks:
            label_values = [self.model_name, str(totals.rank)]
            families["steps"].add_metric(label_values, totals.num_steps)
            families["step_seconds"].add_metric(label_values, totals.step_seconds_total)
            families["forward_seconds"].add_metric(label_values, totals.forward_seconds_total)
            families["stall_seconds"].add_metric(label_values, totals.stall_seconds_total)
            families["staging_blocks"].add_metric(label_values, totals.num_staging_blocks)
            transferred.add_metric([*label_values, "host_to_device"], totals.bytes_to_device_total)
            transferred.add_metric([*label_values, "device_to_host"], totals.bytes_to_host_total)
        yield from families.values()
        yield transferred

    def _iteration_tokens(self, stats: proto.Stats) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "pied:iteration_tokens_total", "Number of tokens per engine step.", labels=[MODEL_NAME]
        )
        counts = stats.iteration_tokens_bucket_counts or [0] * (len(proto.ITERATION_TOKENS_BUCKETS) + 1)
        cumulative, buckets = 0, []
        for bound, count in zip((*proto.ITERATION_TOKENS_BUCKETS, float("inf")), counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cumulative))
        family.add_metric([self.model_name], buckets, stats.num_computed_tokens_total)
        return family


class WorkerProcessCollector(Collector):
    """``prometheus_client``'s process metrics for this process and each worker process (read from
    ``/proc`` at scrape time), labelled with the model and the ``worker``."""

    def __init__(self, model_name: str, engine: EngineCollector) -> None:
        self.model_name = model_name
        self.engine = engine

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        processes = {os.getpid(): "api"}
        for worker, pid in sorted(self.engine.worker_pids.items()):
            processes.setdefault(pid, worker)  # threaded workers share this process's pid
        families: dict[str, Metric] = {}
        for pid, worker in processes.items():
            # registry=None: a collector used once, never registered anywhere.
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    labels = {MODEL_NAME: self.model_name, "worker": worker, **sample.labels}
                    merged.add_sample(sample.name, labels, sample.value)
        yield from families.values()
