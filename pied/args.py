"""Command-line flags shared by ``pied generate`` and ``pied serve``: one ``--flag`` per
``EngineConfig`` field (vLLM's names) and the sampling flags of ``pied generate``."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from pied.default_model import with_default_model
from proto.config import EngineConfig

# Fields that are not flags: internal settings, and the plan the preflight derives.
_HIDDEN_FIELDS = {"extra", "plan"}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per EngineConfig field, named like vLLM's (``max_num_seqs`` -> ``--max-num-seqs``)."""
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        if field.name in _HIDDEN_FIELDS:
            continue
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(flag, dest=field.name, type=base, default=None, metavar=field.name.upper())


def engine_config_from_args(args: argparse.Namespace, **defaults) -> EngineConfig:
    values = dict(defaults)
    for name in EngineConfig.field_names():
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return with_default_model(EngineConfig(**values)).validate()


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=64)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    group.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")
