"""The tiny model bundled inside the package, used when no ``--model`` is given."""

from __future__ import annotations

from pathlib import Path

from proto.config import EngineConfig


def default_model_dir() -> Path:
    return Path(__file__).parent / "models" / "default"


def with_default_model(config: EngineConfig) -> EngineConfig:
    """``config`` with its model folder filled in (the bundled default when none was given)."""
    return config if config.model else config.replace(model=str(default_model_dir()))
