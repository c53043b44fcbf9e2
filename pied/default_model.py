"""The tiny model bundled inside the package, used when no ``--model`` is given."""

from __future__ import annotations

from pathlib import Path

from proto.config import EngineConfig


def default_model_dir() -> Path:
    return Path(__file__).parent / "models" / "default"


DEFAULT_MODEL_NAME = "default"


def with_default_model(config: EngineConfig) -> EngineConfig:
    """``config`` with its model folder filled in: the bundled default when none was given, served
    as ``default`` (the README's quickstart asks for that name) unless another name was given."""
    if config.model:
        return config
    return config.replace(
        model=str(default_model_dir()), served_model_name=config.served_model_name or DEFAULT_MODEL_NAME
    )
