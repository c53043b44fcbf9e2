"""Command-line flags shared by ``pied generate`` and ``pied serve``: one ``--flag`` per
``EngineConfig`` field (vLLM's names), vLLM's aliases and positional model, and the sampling flags
of ``pied generate``."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from pied.default_model import with_default_model
from proto.config import ConfigError, EngineConfig

# Fields that are not flags: internal settings, the plan the preflight derives, and the served
# model names (``pied serve``'s own ``--served-model-name NAME...``: a frontend setting).
_HIDDEN_FIELDS = {"extra", "plan", "served_model_name"}

# vLLM's other spellings of our flags (same meaning, same value).
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "otlp_endpoint": ("--otlp-traces-endpoint",),
}

# Help for the flags whose name does not say enough (the others' are their EngineConfig field).
FLAG_HELP: dict[str, str] = {
    "tensor_parallel_size": "executor ranks, one process each (across --nnodes machines: T/N per node)",
    "distributed_init_method": "how the ranks meet: env:// (MASTER_ADDR/MASTER_PORT; default) or tcp://HEAD:PORT; "
    "with --nnodes above 1 the head also listens on PORT+1..PORT+4+T (see the README)",
    "nnodes": "machines the tensor-parallel ranks span (torchrun's --nnodes); node 0 serves the API",
    "stall_target": "with --expansion adaptive: the share of step time the controller lets host-KV stalls "
    "take (0.02: 2%%); it holds the lease while stalls are within 0.5-1.5x of it and shrinks above",
    "node_rank": "this machine (torchrun's --node-rank): 0 is the head; K > 0 runs only its T/N ranks, "
    "takes every engine setting from the head and ignores API flags",
}

TRUST_REMOTE_CODE_REFUSAL = (
    "--trust-remote-code: pied never runs code from a model folder; it loads the architectures it "
    "implements itself (see the README's table) from config.json and safetensors. Drop the flag."
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per EngineConfig field, named like vLLM's (``max_num_seqs`` -> ``--max-num-seqs``),
    plus vLLM's spellings that pied accepts (see the README) and the positional MODEL."""
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model: a folder, or a Hugging Face id (org/name) already in the local cache "
        "(same as --model)",
    )
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        if field.name in _HIDDEN_FIELDS:
            continue
        flags = ["--" + field.name.replace("_", "-"), *FLAG_ALIASES.get(field.name, ())]
        hint = hints[field.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base is bool:
            group.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(
                *flags,
                dest=field.name,
                type=base,
                default=None,
                metavar=field.name.upper(),
                help=FLAG_HELP.get(field.name),
            )
    group.add_argument(
        "--kv-offloading-size",
        dest="kv_offloading_size",
        type=float,
        default=None,
        metavar="GIB",
        help="vLLM's flag: GiB of host memory for KV; pied pools it (--host-kv-gib, and --kv-policy pie "
        "unless another policy is given)",
    )
    group.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        default=None,
        help="refused: pied never runs model code (vLLM's flag, accepted there)",
    )


def engine_config_from_args(args: argparse.Namespace, **defaults) -> EngineConfig:
    """The EngineConfig of the flags given (ConfigError for vLLM flags that contradict ours)."""
    check_vllm_args(args)
    values = dict(defaults)
    for name in EngineConfig.field_names() - _HIDDEN_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    offloading = getattr(args, "kv_offloading_size", None)
    if offloading is not None:
        values["host_kv_gib"] = offloading
        # vLLM: giving the size turns offloading on; pied's way of using host KV is pooling.
        values.setdefault("kv_policy", "pie")
    if values.get("host_kv_gib") == 0 and values.get("kv_policy", "none") != "none":
        # (Unset, the size is the default; given as 0 it would be read as unset.)
        flag = "--kv-offloading-size" if offloading is not None else "--host-kv-gib"
        raise ConfigError(
            f"{flag} 0 leaves --kv-policy {values['kv_policy']} no host memory: give a positive size, "
            "or --kv-policy none."
        )
    return with_default_model(EngineConfig(**values)).validate()


def check_vllm_args(args: argparse.Namespace) -> None:
    """vLLM's spellings against ours: the positional MODEL and --model, --kv-offloading-size and
    --host-kv-gib must agree when both are given; --trust-remote-code is refused. The positional
    MODEL moves into ``args.model`` (so that a --config file's ``model`` does not override it)."""
    if getattr(args, "trust_remote_code", None):
        raise ConfigError(TRUST_REMOTE_CODE_REFUSAL)
    model_tag, model = getattr(args, "model_tag", None), getattr(args, "model", None)
    if model_tag is not None and model is not None and model_tag != model:
        raise ConfigError(
            f"--model {model!r} and the positional MODEL {model_tag!r} differ; give the model once."
        )
    if model_tag is not None:
        args.model, args.model_tag = model_tag, None
    offloading, host_kv_gib = getattr(args, "kv_offloading_size", None), getattr(args, "host_kv_gib", None)
    if offloading is not None and host_kv_gib is not None and offloading != host_kv_gib:
        raise ConfigError(
            f"--kv-offloading-size {offloading:g} and --host-kv-gib {host_kv_gib:g} differ; they are the "
            "same setting, give one."
        )


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
