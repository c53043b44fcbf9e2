"""Shared fixtures: tiny model folders, built once per session and per distinct configuration."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported: without CUDA, its kernels can only
# run in the interpreter, so switch it on before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tiny_models import build_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model_dir(arch="llama", **build_model_dir kwargs)`` -> a model folder, cached per session.

    Treat the folder as read-only; copy it (``shutil.copytree``) before editing its files.
    """
    folders: dict[str, Path] = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True)
        if key not in folders:
            folders[key] = build_model_dir(tmp_path_factory.mktemp(f"model-{arch}"), arch, **kwargs)
        return folders[key]

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``triton_full`` tests (the whole interpreter suite, minutes on CPU) run only when asked for
    with ``-m triton_full`` (or any -m expression naming it)."""
    if "triton_full" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the full Triton interpreter suite: run with -m triton_full")
    for item in items:
        if "triton_full" in item.keywords:
            item.add_marker(skip)
