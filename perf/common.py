"""Shared pieces of the benchmarks: the SmolLM-135M-shaped random model, prompts, the engine as
production runs it (worker processes by default), JSON output."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from pied.engine import Engine
    from proto.config import EngineConfig

SMOLLM_135M_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    initializer_range=0.02,
)


def smollm_shaped_model(cache_dir: str | None = None) -> Path:
    """A randomly initialised SmolLM-135M-shaped Llama folder (built once per cache dir)."""
    from tiny_models import build_model_dir

    base = Path(cache_dir or tempfile.gettempdir()) / "pied-perf-smollm135m"
    if not (base / "config.json").exists():
        build_model_dir(base, "llama", **SMOLLM_135M_SHAPE)
    return base


def random_prompts(num_prompts: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(5, vocab_size, size=length - 1).tolist() for _ in range(num_prompts)]


def machine() -> dict:
    import os

    import torch

    device = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def emit(result: dict) -> None:
    """One JSON line on stdout: the benchmark's whole result."""
    print(json.dumps(result, sort_keys=True), flush=True)


def add_workers_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        choices=("processes", "threads"),
        default="processes",
        help="run the engine's actors as worker processes, as the daemon does (default), or as "
        "threads of this process, as pied.LLM does",
    )


@contextlib.asynccontextmanager
async def started_engine(config: EngineConfig, workers: str) -> AsyncIterator[Engine]:
    """The one engine, started; shut down on exit. Startup is not part of any measurement."""
    from pied.engine import Engine, SupervisorOptions

    # A loaded machine may take long to import torch in three processes; a 60 s heartbeat timeout
    # keeps a slow moment from reading as a hung worker.
    options = SupervisorOptions(startup_timeout=900, heartbeat_timeout=60, startup_heartbeat_timeout=120)
    engine = Engine(config, options, workers=workers)  # type: ignore[arg-type]
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def warm_up(engine: Engine, prompt: list[int]) -> None:
    """One short request outside the clock (first-call costs: allocation, kernels, caches)."""
    import proto

    params = proto.SamplingParams(temperature=0, max_tokens=2)
    async for _ in engine.add_request(proto.AddRequest("warm", proto.pack_i32(prompt), params)):
        pass
    await engine.wait_idle()


def one_torch_thread() -> None:
    """One compute thread, here and in the worker processes (they inherit OMP_NUM_THREADS): on a
    shared 2-core machine more threads fight the copy thread and other processes and make every
    number noisier."""
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
