"""Shared pieces of the benchmarks: the SmolLM-135M-shaped random model, prompts, JSON output."""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

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
