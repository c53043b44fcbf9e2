"""``pied bench serve``: a load generator and latency/throughput meter for OpenAI-compatible servers.

Python API: ``await run_benchmark(BenchmarkConfig(base_url=..., model=...))`` -> ``BenchmarkResult``.
"""

from pied.bench.command import add_bench_command
from pied.bench.datasets import SampleRequest
from pied.bench.serve import BenchmarkConfig, BenchmarkResult, run_benchmark

__all__ = ["BenchmarkConfig", "BenchmarkResult", "SampleRequest", "add_bench_command", "run_benchmark"]
