"""How much later a streamed response reaches the client than the server counted it, per endpoint:
one real ``pied serve`` (worker processes, the bundled default model) measured by ``pied bench
serve``'s client (:func:`pied.bench.serve.run_benchmark`), one endpoint at a time, the endpoints
interleaved over ``--repeats`` rounds after a warm-up, the server's ``/metrics`` read around each
run. Prints one JSON line:

    python perf/stream_lag.py [--repeats 5] [--num-prompts 8] [--concurrency 4]

Per endpoint, the median and min-max over the rounds (``perf/spread.py``) of

- ``ttft_lag_ms``: the client's mean TTFT less the server's (``pied:time_to_first_token_seconds``,
  counted from when the request's body was read): the request's trip in, and the first chunk's
  trip out. Never negative: the client's interval contains the server's.
- ``itl_lag_ms``: the client's inter-token time less the server's
  (``pied:inter_token_latency_seconds``), per token after each request's first: how much later the
  last chunk reached the client than the first did, spread over the tokens between them.
- ``server_ttft_ms``, ``server_itl_ms``: the scale those lags compare with.

It settled why chat's TTFT looked later than completions': the server's clock started only after
the chat template was rendered (on a thread) and the prompt tokenized, which the client waits for
too; per chunk, chat and completions reach the client equally soon.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from common import emit, machine
from server import ServerProcess, start_server
from spread import aggregate

from pied.bench import BenchmarkConfig, run_benchmark
from pied.default_model import default_model_dir

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
MODEL = "stream-lag"


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> float:
    count = after[f"{name}_count"] - before[f"{name}_count"]
    return (after[f"{name}_sum"] - before[f"{name}_sum"]) / count


def measure(server: ServerProcess, endpoint: str, num_prompts: int, concurrency: int, seed: int) -> dict[str, Any]:
    config = BenchmarkConfig(
        base_url=server.base_url,
        model=MODEL,
        endpoint=endpoint,
        num_prompts=num_prompts,
        random_input_len=24,
        random_output_len=16,
        ignore_eos=True,
        max_concurrency=concurrency,
        seed=seed,
    )
    before = server.metrics()
    result = asyncio.run(run_benchmark(config))
    after = server.metrics()
    if result.metrics["failed"]:
        raise RuntimeError(f"{endpoint}: {result.first_error}")
    server_ttft = histogram_mean(before, after, "pied:time_to_first_token_seconds")
    server_itl = histogram_mean(before, after, "pied:inter_token_latency_seconds")
    num_gaps = after["pied:inter_token_latency_seconds_count"] - before["pied:inter_token_latency_seconds_count"]
    client_itl = sum(sum(output.itl) for output in result.outputs) / num_gaps
    return {
        "ttft_lag_ms": result.metrics["mean_ttft_ms"] - 1000 * server_ttft,
        "itl_lag_ms": 1000 * (client_itl - server_itl),
        "server_ttft_ms": 1000 * server_ttft,
        "server_itl_ms": 1000 * server_itl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of every endpoint, interleaved")
    parser.add_argument("--num-prompts", type=int, default=8, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    args = parser.parse_args()
    if args.repeats < 1 or args.num_prompts < 1 or args.concurrency < 1:
        parser.error("--repeats, --num-prompts and --concurrency must be at least 1")
    server = start_server(default_model_dir(), "--served-model-name", MODEL, "--max-model-len", "256")
    try:
        for endpoint in ENDPOINTS:  # warm-up: the first requests compile and fill caches
            measure(server, endpoint, args.num_prompts, args.concurrency, seed=0)
        runs: dict[str, list[dict[str, Any]]] = {endpoint: [] for endpoint in ENDPOINTS}
        for round_index in range(args.repeats):
            for endpoint in ENDPOINTS:
                runs[endpoint].append(measure(server, endpoint, args.num_prompts, args.concurrency, round_index + 1))
    finally:
        server.stop()
    emit(
        {
            "benchmark": "stream_lag",
            "workers": "processes",
            "client": "pied bench serve",
            "repeats": args.repeats,
            "num_prompts": args.num_prompts,
            "concurrency": args.concurrency,
            "endpoints": {
                endpoint: {".".join(path): str(spread) for path, spread in aggregate(results).items()}
                for endpoint, results in runs.items()
            },
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
