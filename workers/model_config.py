"""What pied needs to know about a Hugging Face model folder, read once from its JSON files.

``ModelConfig.from_folder`` reads ``config.json`` (and ``generation_config.json`` when present) and
checks that safetensors weights are there. Every supported architecture is the Llama decoder with
a few switches (``ModelConfig``'s fields after ``eos_token_ids``), derived here as transformers
derives them from the same file: Qwen3's q/k norms, Gemma 3's (1 + w) norms, scaled embeddings,
sandwich norms and per-layer-type rope, Phi-3's fused checkpoint tensors, partial rotary and
longrope, SmolLM3's layers without rope. It understands both the transformers 4 rope format
(``rope_theta`` + ``rope_scaling``, Gemma's ``rope_local_base_freq``) and the transformers 5 one
(``rope_parameters``, nested per layer type for Gemma 3). Quantized checkpoints are refused,
naming the method, except FP8 (``quant_method: fp8``), whose weights are dequantized at load. This
module imports no torch at import time: the frontend reads the same config without loading a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",  # its text model only
    "Phi3ForCausalLM",
    "SmolLM3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
GEMMA3 = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
# Defaults of transformers' config classes where they differ from Llama's, for keys a config.json omits.
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "Qwen3ForCausalLM": {"head_dim": 128},
    "Gemma3ForCausalLM": {
        # Gemma 3's multimodal configs leave most of text_config to these class defaults.
        "vocab_size": 262_208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131_072,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    },
    "Phi3ForCausalLM": {"original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "SmolLM3ForCausalLM": {
        "tie_word_embeddings": True,
        "rope_theta": 2_000_000.0,
        "no_rope_layer_interval": 4,
    },
}
ARCHITECTURE_DEFAULTS["Gemma3ForConditionalGeneration"] = ARCHITECTURE_DEFAULTS["Gemma3ForCausalLM"]
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
    original_max_position_embeddings: int = 8192  # llama3, longrope
    partial_rotary_factor: float = 1.0  # the leading fraction of head_dim that is rotated
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to the original length
    long_factor: tuple[float, ...] = ()  # longrope: beyond it
    attention_factor: float = 1.0  # longrope: cos and sin are scaled by it


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
    # Per-architecture switches (Llama's values are the plain decoder).
    layer_ropes: tuple[RopeConfig | None, ...]  # per layer: its rotary embedding, None for no rope
    hidden_act: str  # the MLP gate's activation, one of SUPPORTED_ACTIVATIONS
    qk_norm: bool  # RMSNorm over head_dim on each query and key head, before rope (Qwen3, Gemma 3)
    unit_offset_norms: bool  # RMSNorms scale by (1 + w), computed in float32 throughout (Gemma)
    sandwich_norms: bool  # norms after attention and around the MLP too (Gemma)
    embedding_multiplier: float | None  # embeddings times this (Gemma: sqrt(hidden_size))
    attention_scale: float  # multiplies q.k (head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5)
    # tanh soft-cap of the logits. (Gemma 3's attn_logit_softcapping is ignored, as transformers and
    # vLLM ignore it: its q/k norms replaced Gemma 2's attention soft-cap.)
    final_logit_softcap: float | None
    fused_checkpoint: bool  # the checkpoint stores qkv_proj and gate_up_proj fused (Phi-3)
    checkpoint_prefix: str  # the text model's tensor names start with this ("model.")
    # FP8 checkpoints (quant_method "fp8"): the block of rows and columns one weight_scale_inv covers,
    # (0, 0) for a single scale per tensor; their weights are dequantized at load (weight-only: the
    # activations are not quantized). None: unquantized.
    fp8_block_size: tuple[int, int] | None

    def checkpoint_tensor_names(self) -> set[str]:
        """Every tensor the checkpoint must hold (without loading torch: the preflight checks a
        folder's safetensors headers against it). The model's ``CausalLM.checkpoint_targets``
        names the same set (``tests/test_preflight.py`` holds them equal on every architecture)."""
        prefix = self.checkpoint_prefix
        names = {prefix + "embed_tokens.weight", prefix + "norm.weight"}
        if not self.tie_word_embeddings:
            names.add(self.lm_head_name)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        projections = [  # (name, has a bias)
            *(("self_attn.qkv_proj", self.qkv_bias),) * self.fused_checkpoint,
            *((f"self_attn.{p}_proj", self.qkv_bias) for p in "qkv" if not self.fused_checkpoint),
            ("self_attn.o_proj", self.o_proj_bias),
            *(("mlp.gate_up_proj", self.mlp_bias),) * self.fused_checkpoint,
            *((f"mlp.{p}_proj", self.mlp_bias) for p in ("gate", "up") if not self.fused_checkpoint),
            ("mlp.down_proj", self.mlp_bias),
        ]
        for layer in range(self.num_layers):
            at = f"{prefix}layers.{layer}."
            names.update(at + norm + ".weight" for norm in norms)
            if self.qk_norm:
                names.update((at + "self_attn.q_norm.weight", at + "self_attn.k_norm.weight"))
            for name, bias in projections:
                names.add(at + name + ".weight")
                if bias:
                    names.add(at + name + ".bias")
        return names

    @property
    def lm_head_name(self) -> str:
        """The untied lm_head's tensor name (multimodal checkpoints nest it beside the text model)."""
        return (
            "language_model.lm_head.weight"
            if self.checkpoint_prefix == "language_model.model."
            else "lm_head.weight"
        )

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
        raw = read_json_object(config_file)
        generation_file = folder / "generation_config.json"
        generation = read_json_object(generation_file) if generation_file.is_file() else {}
        _check_weights_present(folder)
        return _parse(folder, raw, generation, config_file)


def read_json_object(file: Path) -> dict[str, Any]:
    """A model folder's JSON file, which must hold an object; ModelFolderError naming it otherwise."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{file}: invalid JSON ({error}).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{file}: cannot be read ({error}).") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{file}: expected a JSON object at the top level, not {type(data).__name__}.")
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
    architecture = _architecture(raw, file)
    fp8_block_size = _fp8_block_size(raw, file)
    checkpoint_prefix = "model."
    if architecture == "Gemma3ForConditionalGeneration":
        # The text model's config is nested; its tensors sit under the language model's prefix.
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ModelFolderError(
                f"{file}: a Gemma3ForConditionalGeneration config needs a 'text_config' object."
            )
        fp8_block_size = fp8_block_size or _fp8_block_size(text, file)
        raw = {
            **text,
            **{key: raw[key] for key in ("torch_dtype", "dtype", "tie_word_embeddings") if key in raw},
        }
        checkpoint_prefix = _language_model_prefix(folder)
    raw = ARCHITECTURE_DEFAULTS.get(architecture, {}) | raw

    def required_int(key: str) -> int:
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelFolderError(f"{file}: '{key}' must be a positive integer, got {value!r}.")
        return value

    hidden_size = required_int("hidden_size")
    num_heads = required_int("num_attention_heads")
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise ModelFolderError(
            f"{file}: num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})."
        )
    is_gemma = architecture in GEMMA3
    # Gemma names it hidden_activation (its hidden_act, where present, is a legacy duplicate).
    hidden_act = (raw.get("hidden_activation") if is_gemma else None) or raw.get("hidden_act") or "silu"
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ModelFolderError(
            f"{file}: hidden_act {hidden_act!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}."
        )
    if raw.get("use_bidirectional_attention"):
        raise ModelFolderError(f"{file}: use_bidirectional_attention (an embedding model) is not supported.")
    num_layers = required_int("num_hidden_layers")
    max_position_embeddings = required_int("max_position_embeddings")
    head_dim = raw.get("head_dim") or hidden_size // num_heads
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    # Which projections have biases, as each transformers class builds them.
    # (Mistral's and Phi-3's have none whatever attention_bias says.)
    attention_bias = bool(raw.get("attention_bias", False)) and architecture not in (
        "MistralForCausalLM",
        "Phi3ForCausalLM",
    )
    has_mlp_bias = architecture in ("LlamaForCausalLM", "SmolLM3ForCausalLM")
    return ModelConfig(
        path=folder,
        architecture=architecture,
        hidden_size=hidden_size,
        intermediate_size=required_int("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=required_int("vocab_size"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and no o_proj bias; elsewhere attention_bias covers all four.
        qkv_bias=is_qwen2 or attention_bias,
        o_proj_bias=attention_bias and not is_qwen2,
        mlp_bias=has_mlp_bias and bool(raw.get("mlp_bias", False)),
        rope=_rope(architecture, _rope_parameters(raw, "full_attention", file), raw, file),
        layer_sliding_windows=_sliding_windows(architecture, raw, num_layers, file),
        dtype=_checkpoint_dtype(raw, file),
        bos_token_id=_first(raw.get("bos_token_id"), generation.get("bos_token_id")),
        eos_token_ids=frozenset(_ids(raw.get("eos_token_id")) + _ids(generation.get("eos_token_id"))),
        layer_ropes=_layer_ropes(architecture, raw, num_layers, file),
        hidden_act=hidden_act,
        qk_norm=architecture == "Qwen3ForCausalLM" or is_gemma,
        unit_offset_norms=is_gemma,
        sandwich_norms=is_gemma,
        embedding_multiplier=hidden_size**0.5 if is_gemma else None,
        attention_scale=float(raw["query_pre_attn_scalar"] if is_gemma else head_dim) ** -0.5,
        # transformers caps Gemma3ForCausalLM's logits only, not Gemma3ForConditionalGeneration's
        # (Gemma 3's released configs have no cap anyway).
        final_logit_softcap=_optional_float(
            raw.get("final_logit_softcapping") if architecture == "Gemma3ForCausalLM" else None
        ),
        fused_checkpoint=architecture == "Phi3ForCausalLM",
        checkpoint_prefix=checkpoint_prefix,
        fp8_block_size=fp8_block_size,
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


def _fp8_block_size(raw: dict[str, Any], file: Path) -> tuple[int, int] | None:
    """The FP8 weight scales' block (rows, columns) of an FP8 checkpoint, (0, 0) for one scale per
    tensor, None when unquantized. Any other quantization is refused: its scale tensors would be
    ignored and its weights misread."""
    quantization = raw.get("quantization_config")
    if quantization is None:
        return None
    method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
    if method != "fp8":
        raise ModelFolderError(
            f"{file}: quantized checkpoints are not supported (quantization_config.quant_method {method!r}); "
            "use the unquantized float32, bfloat16 or float16 weights (FP8 checkpoints, quant_method "
            "'fp8', load too)."
        )
    if quantization.get("fmt", "e4m3") != "e4m3":
        raise ModelFolderError(f"{file}: FP8 format {quantization['fmt']!r} is not supported; only e4m3 is.")
    block = quantization.get("weight_block_size", [128, 128])  # transformers' FineGrainedFP8Config default
    if block is None:
        return (0, 0)
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(n, int) and n > 0 for n in block)):
        raise ModelFolderError(
            f"{file}: quantization_config.weight_block_size must be two positive integers."
        )
    return (block[0], block[1])


def _language_model_prefix(folder: Path) -> str:
    """Where a Gemma3ForConditionalGeneration checkpoint keeps its text model's tensors."""
    names = _tensor_names(folder)
    for prefix in ("model.language_model.", "language_model.model."):
        if any(name.startswith(prefix) for name in names):
            return prefix
    raise ModelFolderError(
        f"{folder}: no language model tensors found (expected names starting with "
        "'model.language_model.' or 'language_model.model.')."
    )


def _tensor_names(folder: Path) -> list[str]:
    """Tensor names from the safetensors index, or from the single file's JSON header (no torch)."""
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        return list(weight_map) if isinstance(weight_map, dict) else []
    try:
        with open(folder / SINGLE_WEIGHTS_FILE, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError) as error:
        raise ModelFolderError(
            f"{folder / SINGLE_WEIGHTS_FILE}: corrupt safetensors file ({error})."
        ) from None
    return [name for name in header if name != "__metadata__"] if isinstance(header, dict) else []


def _rope_parameters(raw: dict[str, Any], layer_type: str, file: Path) -> dict[str, Any]:
    """One layer type's rope parameters as a transformers 5 ``rope_parameters`` dict (theta inside)."""
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, dict) and parameters:
        if any(isinstance(value, dict) for value in parameters.values()):  # nested per layer type (Gemma 3)
            nested = parameters.get(layer_type)
            if not isinstance(nested, dict):
                raise ModelFolderError(f"{file}: rope_parameters has no {layer_type!r} entry.")
            theta_key = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
            return {"rope_theta": raw.get(theta_key, 10000.0), **nested}
        return {"rope_theta": raw.get("rope_theta", 10000.0), **parameters}
    # transformers 4: rope_theta beside an optional rope_scaling; Gemma's local layers have their own
    # base and no scaling.
    if layer_type == "sliding_attention" and "rope_local_base_freq" in raw:
        return {"rope_theta": raw["rope_local_base_freq"]}
    return {"rope_theta": raw.get("rope_theta", 10000.0), **(raw.get("rope_scaling") or {})}


def _rope(architecture: str, scaling: dict[str, Any], raw: dict[str, Any], file: Path) -> RopeConfig:
    max_position_embeddings = raw["max_position_embeddings"]
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if architecture == "Phi3ForCausalLM" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi-3's early names for it, renamed as transformers does
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFolderError(
            f"{file}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    # Of our architectures only Phi-3's transformers class rotates part of each head; the others
    # rotate all of head_dim whatever the config says (transformers' output is the same without it).
    partial_rotary_factor = (
        float(scaling.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
        if architecture == "Phi3ForCausalLM"
        else 1.0
    )
    if not 0.0 < partial_rotary_factor <= 1.0:
        raise ModelFolderError(
            f"{file}: partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}."
        )
    if rope_type in ("linear", "llama3") and "factor" not in scaling:
        raise ModelFolderError(f"{file}: rope type {rope_type!r} needs a 'factor'.")
    # A top-level original_max_position_embeddings wins, as transformers' standardize_rope_params does.
    original_max = int(
        raw.get("original_max_position_embeddings")
        or scaling.get("original_max_position_embeddings")
        or max_position_embeddings
    )
    defaults = RopeConfig()
    rope = RopeConfig(
        theta=float(scaling.get("rope_theta", 10000.0)),
        type=rope_type,
        factor=float(scaling.get("factor") or 1.0),
        low_freq_factor=float(scaling.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(scaling.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=original_max,
        partial_rotary_factor=partial_rotary_factor,
    )
    if rope_type != "longrope":
        return rope
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    num_frequencies = int(head_dim * partial_rotary_factor) // 2
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = scaling.get(key)
        if not isinstance(values, list) or len(values) != num_frequencies:
            raise ModelFolderError(
                f"{file}: longrope needs '{key}', a list of {num_frequencies} numbers (one per rotated pair)."
            )
        factors[key] = tuple(float(value) for value in values)
    # transformers: without an explicit factor, the context extension ratio; the attention factor from it.
    factor = scaling.get("factor") or max_position_embeddings / original_max
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    return replace(rope, factor=float(factor), attention_factor=float(attention_factor), **factors)


def _layer_types(architecture: str, raw: dict[str, Any], num_layers: int, file: Path) -> list[str]:
    """Each layer's "full_attention" or "sliding_attention", as the architecture's config derives them."""
    layer_types = raw.get("layer_types")
    if layer_types is None:
        if architecture in GEMMA3:
            pattern = raw.get("sliding_window_pattern", 6)
            layer_types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
            ]
        elif architecture == "SmolLM3ForCausalLM":
            has_rope = _smollm3_rope_layers(raw, num_layers, file)
            sliding = raw.get("use_sliding_window") and raw.get("sliding_window") is not None
            layer_types = [
                "sliding_attention" if sliding and not rope else "full_attention" for rope in has_rope
            ]
        else:
            # Qwen2/Qwen3: layers from max_window_layers on slide (when use_sliding_window is on).
            max_window_layers = raw.get("max_window_layers", 28)
            layer_types = [
                "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(num_layers)
            ]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ModelFolderError(f"{file}: 'layer_types' must list one type per layer ({num_layers}).")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ModelFolderError(f"{file}: layer type {sorted(unknown)[0]!r} is not supported.")
    return layer_types


def _sliding_windows(
    architecture: str, raw: dict[str, Any], num_layers: int, file: Path
) -> tuple[int | None, ...]:
    window = raw.get("sliding_window") or None  # 0: none (use_sliding_window false; model_folder)
    if architecture in ("MistralForCausalLM", "Phi3ForCausalLM"):
        return (window,) * num_layers
    sliding = architecture in GEMMA3 or (
        architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM")
        and raw.get("use_sliding_window")
    )
    if not (sliding and window):
        return (None,) * num_layers
    layer_types = _layer_types(architecture, raw, num_layers, file)
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _layer_ropes(
    architecture: str, raw: dict[str, Any], num_layers: int, file: Path
) -> tuple[RopeConfig | None, ...]:
    if architecture in GEMMA3:
        ropes = {
            kind: _rope(architecture, _rope_parameters(raw, kind, file), raw, file)
            for kind in ("full_attention", "sliding_attention")
        }
        return tuple(ropes[kind] for kind in _layer_types(architecture, raw, num_layers, file))
    rope = _rope(architecture, _rope_parameters(raw, "full_attention", file), raw, file)
    if architecture == "SmolLM3ForCausalLM":
        return tuple(rope if has_rope else None for has_rope in _smollm3_rope_layers(raw, num_layers, file))
    return (rope,) * num_layers


def _smollm3_rope_layers(raw: dict[str, Any], num_layers: int, file: Path) -> list[bool]:
    """SmolLM3's ``no_rope_layers``: despite the name, 1 marks a layer that *uses* rope."""
    flags = raw.get("no_rope_layers")
    if flags is None:
        interval = raw.get("no_rope_layer_interval", 4)
        return [(i + 1) % interval != 0 for i in range(num_layers)]
    if not isinstance(flags, list) or len(flags) != num_layers:
        raise ModelFolderError(f"{file}: 'no_rope_layers' must list one flag per layer ({num_layers}).")
    return [bool(flag) for flag in flags]


def _checkpoint_dtype(raw: dict[str, Any], file: Path) -> str:
    name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").removeprefix("torch.")
    if name not in DTYPE_ALIASES:
        raise ModelFolderError(f"{file}: dtype {name!r} is not supported; use float32, bfloat16 or float16.")
    return DTYPE_ALIASES[name]


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _first(*values: Any) -> int | None:
    return next((int(v) for v in values if v is not None), None)
