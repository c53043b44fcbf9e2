"""What ``pied bench serve`` measures, computed from per-request outputs — vLLM's definitions:

- **TTFT**: from sending the request to the first chunk that carries generated text.
- **ITL**: the gaps between consecutive text chunks (one token per chunk while decoding).
- **TPOT**: per request, ``(latency - TTFT) / (output tokens - 1)``; requests of one token have none.
- **E2EL**: from sending the request to the end of its stream.
- **goodput**: completed requests per second that met every SLO given (``ttft``, ``tpot``, ``e2el``,
  in milliseconds).

Token counts are the server's ``usage``. Percentiles interpolate linearly (numpy's default), as
vLLM's do. Times in the result are milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


@dataclass
class RequestOutput:
    """One request as the client saw it; times in seconds."""

    success: bool = False
    prompt_len: int = 0  # usage.prompt_tokens
    output_tokens: int = 0  # usage.completion_tokens
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_metric_list(text: str) -> list[str]:
    """``"ttft,tpot"`` -> ``["ttft", "tpot"]``, checked against :data:`METRICS`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"--percentile-metrics: expected a comma list of {', '.join(METRICS)}, got {text!r}")
    return names


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` -> ``[50.0, 90.0, 99.0]``, each in (0, 100]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles: expected numbers like 50,90,99, got {text!r}") from None
    if not values or any(not 0 < value <= 100 for value in values):
        raise ValueError(f"--metric-percentiles: each percentile must be in (0, 100], got {text!r}")
    return values


def parse_goodput(items: list[str]) -> dict[str, float]:
    """vLLM's ``--goodput ttft:500 tpot:50`` form -> ``{"ttft": 500.0, "tpot": 50.0}`` (ms)."""
    slos: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput: {item!r}: the metric must be ttft, tpot or e2el")
        try:
            milliseconds = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r}: expected NAME:MILLISECONDS") from None
        if milliseconds <= 0:
            raise ValueError(f"--goodput: {item!r}: the SLO must be positive")
        slos[name] = milliseconds
    return slos


def percentile_label(percentile: float) -> str:
    """99 -> "p99", 99.9 -> "p99.9" (vLLM's key names)."""
    return f"p{int(percentile) if percentile == int(percentile) else percentile}"


def meets_slos(output: RequestOutput, slos: dict[str, float]) -> bool:
    measured = {"ttft": output.ttft, "tpot": output.tpot or 0.0, "e2el": output.latency}
    return all(measured[name] * 1000 <= limit for name, limit in slos.items())


def summarize(values_ms: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean, median, std and the percentiles of ``values_ms``; zeros when there are none."""
    data = np.asarray(values_ms, dtype=float) if values_ms else np.zeros(1)
    summary = {
        "mean": float(np.mean(data)),
        "median": float(np.median(data)),
        "std": float(np.std(data)),
    }
    for percentile in percentiles:
        summary[percentile_label(percentile)] = float(np.percentile(data, percentile))
    return summary


def calculate_metrics(
    outputs: list[RequestOutput],
    duration: float,
    selected: list[str] | tuple[str, ...] = METRICS,
    percentiles: list[float] | tuple[float, ...] = (99.0,),
    slos: dict[str, float] | None = None,
) -> dict[str, float | int]:
    """The result's aggregate keys (vLLM's names): counts, throughputs and, for each selected
    metric, ``mean_<m>_ms``, ``median_<m>_ms``, ``std_<m>_ms`` and ``p<q>_<m>_ms``."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    done = [output for output in outputs if output.success]
    total_input = sum(output.prompt_len for output in done)
    total_output = sum(output.output_tokens for output in done)
    result: dict[str, float | int] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    if slos:
        result["request_goodput"] = sum(meets_slos(output, slos) for output in done) / duration
    values = {
        "ttft": [output.ttft * 1000 for output in done],
        "tpot": [output.tpot * 1000 for output in done if output.tpot is not None],
        "itl": [gap * 1000 for output in done for gap in output.itl],
        "e2el": [output.latency * 1000 for output in done],
    }
    for metric in selected:
        for statistic, value in summarize(values[metric], list(percentiles)).items():
            result[f"{statistic}_{metric}_ms"] = value
    return result
