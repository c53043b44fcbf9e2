"""Prometheus metrics for the API server, in the text exposition format (version 0.0.4), by hand.

Names follow vLLM's ``vllm:*`` metrics with a ``pied:`` prefix. Gauges and totals of engine state
are read from ``EngineClient.stats()`` (the scheduler's ``proto.Stats``, whose ``*_total`` fields
carry the names exported here) when scraped; request timings are observed by the API as each
engine request (one choice) streams its deltas, so ``n`` choices count as ``n`` requests, as in vLLM.

What the latency histograms measure (the frontend's clock, so they include the IPC hop):

- ``time_to_first_token``: from the request's arrival at the API to its first token.
- ``inter_token_latency``: time between consecutive deltas, divided evenly among the tokens of the
  later delta (one token per step while decoding).
- ``e2e_request_latency``: from arrival to the delta that finished the request.
- ``request_queue_time``: an estimate, since the frontend never sees when the scheduler first
  scheduled a request: time to first token minus the step time (the running average of
  inter-token latency), clamped at 0. It overestimates by the part of the prefill that is slower
  than a decode step.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Iterator, Sequence

import proto

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")

Labels = tuple[tuple[str, str], ...]


def format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels) + "}"


class Metric:
    """One metric family: a name, its HELP text, its TYPE and samples keyed by label values."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help_text = help_text

    def samples(self) -> Iterator[tuple[str, Labels, float]]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help_text)}", f"# TYPE {self.name} {self.kind}"]
        lines.extend(
            f"{name}{format_labels(labels)} {format_value(value)}" for name, labels, value in self.samples()
        )
        return "\n".join(lines) + "\n"


class Gauge(Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.values: dict[Labels, float] = {}

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = float(value)

    def samples(self) -> Iterator[tuple[str, Labels, float]]:
        for labels, value in self.values.items():
            yield self.name, labels, value


class Counter(Gauge):
    """A monotonic count. The name carries the ``_total`` suffix, as prometheus_client writes it in
    the 0.0.4 text format (TYPE line and samples both use the full name)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.bounds = tuple(sorted(buckets))
        self.bucket_counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "less or equal").
        self.bucket_counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def samples(self) -> Iterator[tuple[str, Labels, float]]:
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), self.bucket_counts):
            cumulative += count
            yield f"{self.name}_bucket", (("le", format_value(bound)),), float(cumulative)
        yield f"{self.name}_sum", (), self.sum
        yield f"{self.name}_count", (), float(self.count)


class RequestTiming:
    """Timestamps of one engine request, as the frontend sees them (``time.monotonic()``)."""

    __slots__ = ("arrival", "first_token", "last_token")

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None


class ServerMetrics:
    """The API server's metrics; ``render(stats)`` produces the ``/metrics`` body."""

    def __init__(self) -> None:
        self.num_requests_running = Gauge(
            "pied:num_requests_running", "Number of requests in the running batch."
        )
        self.num_requests_waiting = Gauge(
            "pied:num_requests_waiting", "Number of requests waiting to be scheduled."
        )
        self.kv_cache_usage = Gauge(
            "pied:kv_cache_usage_perc",
            "KV cache usage per tier as a fraction of its blocks (1 means 100 percent); "
            "host is relative to the blocks currently leased.",
        )
        self.num_preemptions = Counter("pied:num_preemptions_total", "Cumulative number of preemptions.")
        self.prefix_cache_queries = Counter(
            "pied:prefix_cache_queries_total",
            "Prefix cache lookups, in tokens: the tokens of each request admitted with prefix caching on.",
        )
        self.prefix_cache_hits = Counter(
            "pied:prefix_cache_hits_total",
            "Prefix cache hits, in tokens (prefill skipped), by the tier that held the cached blocks.",
        )
        # Host memory pooling (DESIGN.md "KV memory", "Adaptive expansion").
        self.host_lease = Gauge("pied:host_kv_lease_blocks", "Host KV blocks the scheduler may hold (the lease).")
        self.host_lease_target = Gauge(
            "pied:host_kv_lease_target_blocks",
            "The expansion controller's estimate of the largest lease whose streaming stays transparent.",
        )
        self.host_link_bandwidth = Gauge(
            "pied:host_kv_link_bandwidth_bytes_per_second",
            "The expansion controller's host -> device bandwidth estimate (0 while unknown).",
        )
        self.host_decision = Gauge(
            "pied:host_kv_controller_decision",
            "The expansion controller's last decision (value 1, labelled with its action and reason).",
        )
        self.bytes_streamed = Counter(
            "pied:kv_bytes_transferred_total", "KV bytes moved between host and device, by direction."
        )
        self.stall_seconds = Counter(
            "pied:stall_seconds_total", "Seconds compute waited for host KV copies (the stalls)."
        )
        self.step_seconds = Counter(
            "pied:step_seconds_total",
            "Seconds the executor spent on steps (inputs, forward pass, sampling).",
        )
        self.prompt_tokens = Counter("pied:prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = Counter(
            "pied:generation_tokens_total", "Number of generation tokens processed."
        )
        self.request_success = Counter(
            "pied:request_success_total", "Count of finished engine requests by finish reason."
        )
        for reason in FINISH_REASONS:
            self.request_success.inc(0, finished_reason=reason)
        self.prompt_tokens.inc(0)
        self.generation_tokens.inc(0)
        self.time_to_first_token = Histogram(
            "pied:time_to_first_token_seconds",
            "Time from arrival at the API to the first token.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = Histogram(
            "pied:inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS
        )
        self.e2e_request_latency = Histogram(
            "pied:e2e_request_latency_seconds",
            "Time from arrival at the API to the last token.",
            REQUEST_BUCKETS,
        )
        self.request_queue_time = Histogram(
            "pied:request_queue_time_seconds",
            "Estimated time waiting before the first step: time to first token minus the average step time.",
            REQUEST_BUCKETS,
        )
        self._step_time_average = 0.0  # running average of inter-token latency, for the queue estimate

    def metrics(self) -> Iterable[Metric]:
        return (
            self.num_requests_running,
            self.num_requests_waiting,
            self.kv_cache_usage,
            self.num_preemptions,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.host_lease,
            self.host_lease_target,
            self.host_link_bandwidth,
            self.host_decision,
            self.bytes_streamed,
            self.stall_seconds,
            self.step_seconds,
            self.prompt_tokens,
            self.generation_tokens,
            self.request_success,
            self.time_to_first_token,
            self.inter_token_latency,
            self.e2e_request_latency,
            self.request_queue_time,
        )

    # ---------------------------------------------------------------- per engine request

    def observe_tokens(
        self, timing: RequestTiming, num_tokens: int, num_prompt_tokens: int, now: float | None = None
    ) -> None:
        """A delta with ``num_tokens`` new tokens arrived for the request timed by ``timing``."""
        if num_tokens <= 0:
            return
        now = time.monotonic() if now is None else now
        self.generation_tokens.inc(num_tokens)
        if timing.first_token is None:
            timing.first_token = now
            ttft = now - timing.arrival
            self.time_to_first_token.observe(ttft)
            self.request_queue_time.observe(max(0.0, ttft - self._step_time_average))
            self.prompt_tokens.inc(num_prompt_tokens)
            # The first delta's tokens beyond the first were produced by the same steps; no ITL for them.
        else:
            assert timing.last_token is not None
            per_token = (now - timing.last_token) / num_tokens
            for _ in range(num_tokens):
                self.inter_token_latency.observe(per_token)
            # An exponential average follows the batch's current step time without keeping history.
            self._step_time_average += 0.05 * (per_token - self._step_time_average)
        timing.last_token = now

    def observe_finish(self, timing: RequestTiming, finish_reason: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.request_success.inc(finished_reason=finish_reason)
        self.e2e_request_latency.observe(now - timing.arrival)

    # ---------------------------------------------------------------- exposition

    def render(self, stats: proto.Stats) -> str:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.device_usage, tier="device")
        self.kv_cache_usage.set(stats.host_usage, tier="host")
        self.num_preemptions.values[()] = float(stats.num_preemptions)
        # Engine totals: set, not incremented (the snapshot already holds the running sum).
        self.prefix_cache_queries.values[()] = float(stats.prefix_cache_queries_total)
        self.prefix_cache_hits.set(stats.prefix_cache_device_hits_total, tier="device")
        self.prefix_cache_hits.set(stats.prefix_cache_host_hits_total, tier="host")
        self.host_lease.set(stats.host_lease)
        self.host_lease_target.set(stats.host_lease_target)
        self.host_link_bandwidth.set(stats.host_link_bandwidth)
        if stats.host_decision:
            action, _, reason = stats.host_decision.partition(":")
            self.host_decision.values.clear()
            self.host_decision.set(1, action=action.strip(), reason=reason.strip())
        self.bytes_streamed.set(stats.bytes_to_device_total, direction="host_to_device")
        self.bytes_streamed.set(stats.bytes_to_host_total, direction="device_to_host")
        self.stall_seconds.values[()] = float(stats.stall_seconds_total)
        self.step_seconds.values[()] = float(stats.step_seconds_total)
        return "".join(metric.render() for metric in self.metrics())


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
