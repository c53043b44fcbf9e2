"""Shared fixtures: tiny model folders, built once per session and per distinct configuration."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
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
