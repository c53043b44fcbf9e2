"""What pied needs to know about a Hugging Face model folder, read once from its JSON files.

``ModelConfig.from_folder`` reads ``config.json`` (and ``generation_config.json`` when present) of a
Llama-family model and checks that safetensors weights are there. It understands both the
transformers 4 rope format (``rope_theta`` + ``rope_scaling``) and the transformers 5 one
(``rope_parameters``). This module imports no torch at import time: the frontend reads the same
config without loading a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


class ModelFolderError(ValueError):
    """A model folder pied cannot serve; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters, normalised from either config format."""

    theta: float = 10000.0
    type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    rope: RopeConfig
    layer_sliding_windows: tuple[int | None, ...]  # per layer: attend to the last N positions, or all
    dtype: str  # the checkpoint's dtype: float32 | bfloat16 | float16
    bos_token_id: int | None
    eos_token_ids: frozenset[int]

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        folder = Path(path)
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: model folder does not exist (or is not a directory).")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ModelFolderError(
                f"{config_file}: not found; a Hugging Face model folder needs config.json."
            )
        raw = _read_json(config_file)
        generation_file = folder / "generation_config.json"
        generation = _read_json(generation_file) if generation_file.is_file() else {}
        _check_weights_present(folder)
        return _parse(folder, raw, generation, config_file)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{file}: invalid JSON ({error}).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{file}: cannot be read ({error}).") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{file}: expected a JSON object at the top level.")
    return data


def _check_weights_present(folder: Path) -> None:
    if (folder / SINGLE_WEIGHTS_FILE).is_file() or (folder / WEIGHTS_INDEX_FILE).is_file():
        return
    hint = ""
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        hint = " Only safetensors weights are supported; convert the PyTorch .bin files to safetensors."
    raise ModelFolderError(
        f"{folder}: no weights found; expected {SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} with its shards.{hint}"
    )


def _parse(folder: Path, raw: dict[str, Any], generation: dict[str, Any], file: Path) -> ModelConfig:
    def required_int(key: str) -> int:
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelFolderError(f"{file}: '{key}' must be a positive integer, got {value!r}.")
        return value

    architecture = _architecture(raw, file)
    hidden_size = required_int("hidden_size")
    num_heads = required_int("num_attention_heads")
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise ModelFolderError(
            f"{file}: num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})."
        )
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ModelFolderError(f"{file}: hidden_act {hidden_act!r} is not supported; only silu is.")
    num_layers = required_int("num_hidden_layers")
    max_position_embeddings = required_int("max_position_embeddings")
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        path=folder,
        architecture=architecture,
        hidden_size=hidden_size,
        intermediate_size=required_int("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=raw.get("head_dim") or hidden_size // num_heads,
        vocab_size=required_int("vocab_size"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias covers all four.
        qkv_bias=is_qwen2 or attention_bias,
        o_proj_bias=attention_bias and not is_qwen2,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        rope=_rope(raw, max_position_embeddings, file),
        layer_sliding_windows=_sliding_windows(architecture, raw, num_layers),
        dtype=_checkpoint_dtype(raw, file),
        bos_token_id=_first(raw.get("bos_token_id"), generation.get("bos_token_id")),
        eos_token_ids=frozenset(_ids(raw.get("eos_token_id")) + _ids(generation.get("eos_token_id"))),
    )


def _architecture(raw: dict[str, Any], file: Path) -> str:
    declared = raw.get("architectures") or []
    if not declared and raw.get("model_type") in MODEL_TYPE_ARCHITECTURES:
        declared = [MODEL_TYPE_ARCHITECTURES[raw["model_type"]]]
    for name in declared:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(map(str, declared)) or f"none (model_type {raw.get('model_type')!r})"
    raise ModelFolderError(
        f"{file}: architecture {found} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
    )


def _rope(raw: dict[str, Any], max_position_embeddings: int, file: Path) -> RopeConfig:
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, dict) and parameters:  # transformers 5: theta lives inside
        scaling = parameters
        theta = parameters.get("rope_theta", raw.get("rope_theta", 10000.0))
    else:  # transformers 4: rope_theta beside an optional rope_scaling
        scaling = raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFolderError(
            f"{file}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelFolderError(f"{file}: partial_rotary_factor other than 1.0 is not supported.")
    if rope_type != "default" and "factor" not in scaling:
        raise ModelFolderError(f"{file}: rope type {rope_type!r} needs a 'factor'.")
    defaults = RopeConfig()
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(scaling.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings")
            or raw.get("original_max_position_embeddings")
            or max_position_embeddings
        ),
    )


def _sliding_windows(architecture: str, raw: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if architecture == "MistralForCausalLM":
        return (window,) * num_layers
    if architecture == "Qwen2ForCausalLM" and raw.get("use_sliding_window") and window:
        # As transformers does: explicit layer_types win; otherwise layers from max_window_layers on slide.
        max_window_layers = raw.get("max_window_layers", 28)
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(num_layers)
        ]
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return (None,) * num_layers


def _checkpoint_dtype(raw: dict[str, Any], file: Path) -> str:
    name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch.")
    if name not in DTYPE_ALIASES:
        raise ModelFolderError(f"{file}: dtype {name!r} is not supported; use float32, bfloat16 or float16.")
    return DTYPE_ALIASES[name]


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first(*values: Any) -> int | None:
    return next((int(v) for v in values if v is not None), None)
