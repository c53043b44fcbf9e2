"""Reading a Hugging Face model folder: the fields pied uses, both rope formats, dtypes, and errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.model_config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    ModelFolderError,
    RopeConfig,
)
from workers.plan import dtype_name


def editable_copy(folder: Path, tmp_path: Path) -> Path:
    return shutil.copytree(folder, tmp_path / "model")


def edit_config(folder: Path, **changes) -> None:
    """Set (or with value None, remove) top-level keys of config.json."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


def test_llama_fields(tiny_model_dir):
    config = ModelConfig.from_folder(tiny_model_dir("llama"))
    assert config.architecture == "LlamaForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (64, 128, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert (config.vocab_size, config.max_position_embeddings, config.rms_norm_eps) == (512, 512, 1e-6)
    assert not config.tie_word_embeddings and not config.qkv_bias and not config.o_proj_bias
    assert config.rope == RopeConfig(theta=10000.0, original_max_position_embeddings=512)
    assert config.layer_sliding_windows == (None, None)
    assert config.dtype == "float32" and config.bos_token_id == 1 and config.eos_token_ids == {2}


def test_qwen2_always_has_qkv_bias(tiny_model_dir):
    config = ModelConfig.from_folder(tiny_model_dir("qwen2", sharded=True))
    assert config.qkv_bias and not config.o_proj_bias
    assert config.layer_sliding_windows == (None, None)  # use_sliding_window is off


def test_llama_attention_bias_covers_all_projections(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    edit_config(folder, attention_bias=True)
    config = ModelConfig.from_folder(folder)
    assert config.qkv_bias and config.o_proj_bias


def test_sliding_windows(tiny_model_dir, tmp_path):
    assert ModelConfig.from_folder(tiny_model_dir("mistral")).layer_sliding_windows == (4096, 4096)
    qwen = editable_copy(tiny_model_dir("qwen2", sharded=True), tmp_path)
    edit_config(qwen, use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None)
    assert ModelConfig.from_folder(qwen).layer_sliding_windows == (None, 8)
    edit_config(qwen, layer_types=["sliding_attention", "full_attention"])
    assert ModelConfig.from_folder(qwen).layer_sliding_windows == (8, None)


def test_rope_formats_agree(tiny_model_dir, tmp_path):
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = tiny_model_dir("llama", rope_scaling={"rope_type": "llama3", **scaling}, rope_theta=500000.0)
    new_format = ModelConfig.from_folder(folder).rope
    assert new_format == RopeConfig(theta=500000.0, type="llama3", **scaling)
    old = editable_copy(folder, tmp_path)
    edit_config(old, rope_parameters=None, rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})
    assert ModelConfig.from_folder(old).rope == new_format
    edit_config(old, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert (
        ModelConfig.from_folder(old).rope.type == "linear" and ModelConfig.from_folder(old).rope.factor == 2.0
    )


def test_defaults_for_optional_keys(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    edit_config(
        folder,
        num_key_value_heads=None,
        head_dim=None,
        rope_parameters=None,
        dtype=None,
        torch_dtype="bfloat16",
    )
    config = ModelConfig.from_folder(folder)
    assert (config.num_kv_heads, config.head_dim, config.rope.theta) == (4, 16, 10000.0)
    assert config.dtype == "bfloat16"


def test_eos_ids_merge_config_and_generation_config(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("llama", extra_eos=[4]), tmp_path)
    assert ModelConfig.from_folder(folder).eos_token_ids == {2, 4}
    edit_config(folder, eos_token_id=[2, 7])
    (folder / "generation_config.json").unlink()
    assert ModelConfig.from_folder(folder).eos_token_ids == {2, 7}


@pytest.mark.parametrize(
    "name, config_dtype, device, expected",
    [
        ("auto", "bfloat16", "cpu", torch.bfloat16),
        ("auto", "float32", "cuda", torch.float32),
        ("auto", "float16", "cuda", torch.float16),
        ("auto", "float16", "cpu", torch.float32),  # CPU float16 matmuls are slow: auto avoids them
        ("float16", "float32", "cpu", torch.float16),  # explicit wins
        ("fp16", "float32", "cuda", torch.float16),
        ("half", "float32", "cuda", torch.float16),
        ("bf16", "float32", "cpu", torch.bfloat16),
        ("fp32", "bfloat16", "cuda", torch.float32),
        ("float", "bfloat16", "cuda", torch.float32),
    ],
)
def test_resolve_dtype(name, config_dtype, device, expected):
    assert getattr(torch, dtype_name(name, config_dtype, device)) == expected


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match="int8"):
        dtype_name("int8", "float32", "cpu")


# ---------------------------------------------------------------- errors name the file at fault


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match=f"{tmp_path / 'nope'}: model folder does not exist"):
        ModelConfig.from_folder(tmp_path / "nope")


def test_missing_config_json(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="config.json: not found"):
        ModelConfig.from_folder(folder)


@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
def test_invalid_json(tiny_model_dir, tmp_path, file):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    (folder / file).write_text('{"hidden_size": 64,')
    with pytest.raises(ModelFolderError, match=f"{folder / file}: invalid JSON"):
        ModelConfig.from_folder(folder)


def test_unsupported_architecture_lists_supported_ones(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelFolderError) as error:
        ModelConfig.from_folder(folder)
    message = str(error.value)
    assert str(folder / "config.json") in message and "GPT2LMHeadModel" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)


def test_architecture_from_model_type_when_architectures_missing(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("mistral"), tmp_path)
    edit_config(folder, architectures=None)
    assert ModelConfig.from_folder(folder).architecture == "MistralForCausalLM"


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_size=None), "'hidden_size' must be a positive integer"),
        (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope type 'yarn'"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "needs a 'factor'"),
        (dict(dtype="int4"), "dtype 'int4'"),
    ],
)
def test_bad_config_values(tiny_model_dir, tmp_path, changes, message):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ModelFolderError, match=message) as error:
        ModelConfig.from_folder(folder)
    assert str(folder / "config.json") in str(error.value)


@pytest.mark.parametrize("leftover", [None, "pytorch_model.bin"])
def test_missing_weights(tiny_model_dir, tmp_path, leftover):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    (folder / "model.safetensors").unlink()
    if leftover:
        (folder / leftover).write_bytes(b"")
    with pytest.raises(ModelFolderError, match="no weights found") as error:
        ModelConfig.from_folder(folder)
    assert str(folder) in str(error.value) and "model.safetensors" in str(error.value)
    assert ("convert" in str(error.value)) == bool(leftover)


# ---------------------------------------------------------------- newer architectures' switches


def test_qwen3_fields(tiny_model_dir):
    config = ModelConfig.from_folder(tiny_model_dir("qwen3"))
    assert config.architecture == "Qwen3ForCausalLM" and config.qk_norm
    assert config.head_dim == 24 and config.attention_scale == 24**-0.5  # head_dim is not hidden / heads
    assert not config.qkv_bias and not config.o_proj_bias and not config.unit_offset_norms


def test_gemma3_fields(tiny_model_dir):
    config = ModelConfig.from_folder(tiny_model_dir("gemma3"))
    assert config.architecture == "Gemma3ForCausalLM"
    assert config.qk_norm and config.unit_offset_norms and config.sandwich_norms
    assert config.hidden_act == "gelu_pytorch_tanh" and config.tie_word_embeddings
    assert config.embedding_multiplier == 64**0.5 and config.attention_scale == 20**-0.5
    assert config.final_logit_softcap == 30.0
    assert config.layer_sliding_windows == (5, None)
    local, global_ = config.layer_ropes
    assert local == RopeConfig(theta=10000.0, original_max_position_embeddings=512)
    assert global_ == RopeConfig(theta=1e6, type="linear", factor=2.0, original_max_position_embeddings=512)


def test_gemma3_transformers4_keys(tiny_model_dir, tmp_path):
    """rope_local_base_freq, rope_scaling on global layers only, and sliding_window_pattern."""
    folder = editable_copy(tiny_model_dir("gemma3", num_hidden_layers=6, layer_types=None), tmp_path)
    edit_config(
        folder,
        rope_parameters=None,
        layer_types=None,
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window_pattern=3,
    )
    config = ModelConfig.from_folder(folder)
    assert config.layer_sliding_windows == (5, 5, None, 5, 5, None)
    assert [rope.theta for rope in config.layer_ropes] == [1e4, 1e4, 1e6, 1e4, 1e4, 1e6]
    assert [rope.factor for rope in config.layer_ropes] == [1.0, 1.0, 8.0, 1.0, 1.0, 8.0]


def test_phi3_fields(tiny_model_dir):
    config = ModelConfig.from_folder(tiny_model_dir("phi3"))
    assert config.fused_checkpoint and config.rope.partial_rotary_factor == 0.5
    assert config.layer_ropes == (config.rope, config.rope)


def test_phi3_longrope_as_transformers_derives_it(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("phi3"), tmp_path)
    short, long = [1.0, 1.5, 2.0, 3.0], [2.0, 4.0, 8.0, 16.0]
    # Phi-3's transformers 4 format: "su" is longrope's old name; no factor, so max / original.
    edit_config(
        folder,
        rope_parameters=None,
        rope_theta=10000.0,
        rope_scaling={"type": "su", "short_factor": short, "long_factor": long},
        original_max_position_embeddings=32,
    )
    rope = ModelConfig.from_folder(folder).rope
    assert rope.type == "longrope" and rope.original_max_position_embeddings == 32
    assert (rope.short_factor, rope.long_factor) == (tuple(short), tuple(long))
    assert rope.factor == 512 / 32
    assert rope.attention_factor == pytest.approx((1 + math.log(16) / math.log(32)) ** 0.5)
    edit_config(folder, rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long[:3]})
    with pytest.raises(ModelFolderError, match="longrope needs 'long_factor', a list of 4 numbers"):
        ModelConfig.from_folder(folder)


def test_smollm3_layers_without_rope(tiny_model_dir, tmp_path):
    config = ModelConfig.from_folder(tiny_model_dir("smollm3"))
    assert config.layer_ropes[0] is not None and config.layer_ropes[1] is None
    assert config.rope.theta == 2e6
    folder = editable_copy(tiny_model_dir("smollm3"), tmp_path)
    edit_config(folder, no_rope_layers=None, no_rope_layer_interval=2)
    assert [rope is None for rope in ModelConfig.from_folder(folder).layer_ropes] == [False, True]


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors", "bitsandbytes", "fbgemm_fp8"])
def test_quantized_checkpoint_is_refused_naming_the_method(tiny_model_dir, tmp_path, method):
    folder = editable_copy(tiny_model_dir("qwen3"), tmp_path)
    edit_config(folder, quantization_config={"quant_method": method, "bits": 4})
    with pytest.raises(ModelFolderError, match=f"quant_method '{method}'") as error:
        ModelConfig.from_folder(folder)
    assert str(folder / "config.json") in str(error.value)


@pytest.mark.e2e
@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve", "--port", "0"]])
def test_cli_refuses_a_quantized_checkpoint(tiny_model_dir, tmp_path, command):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    edit_config(folder, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})
    run = subprocess.run(
        [sys.executable, "-m", "pied", command[0], "--model", str(folder), *command[1:]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "quantization_config.quant_method 'awq'" in run.stderr and "Traceback" not in run.stderr


def test_gemma3_multimodal_folder_reads_its_text_config(tiny_model_dir, tmp_path):
    """As on the Hub (gemma-3-4b-it): text_config names only what differs from the class defaults."""
    folder = editable_copy(tiny_model_dir("gemma3-multimodal"), tmp_path)
    edit_config(
        folder,
        text_config={
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    )
    config = ModelConfig.from_folder(folder)
    assert config.architecture == "Gemma3ForConditionalGeneration"
    assert config.checkpoint_prefix == "language_model.model."
    assert (config.vocab_size, config.num_heads, config.num_kv_heads, config.head_dim) == (262208, 8, 4, 256)
    assert config.layer_sliding_windows[:6] == (1024,) * 5 + (None,)
    assert [(rope.theta, rope.factor) for rope in config.layer_ropes[4:6]] == [(1e4, 1.0), (1e6, 8.0)]
    assert config.tie_word_embeddings and config.final_logit_softcap is None


PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]  # fmt: skip
PUBLISHED_CONFIGS = {
    # microsoft/Phi-4-mini-instruct (transformers 4 keys)
    "phi-4-mini": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_act": "silu",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "num_attention_heads": 24,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "partial_rotary_factor": 0.75,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": PHI4_MINI_LONG_FACTOR, "short_factor": [1.0] * 48, "type": "longrope"},
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vocab_size": 200064,
    },
    # google/gemma-3-1b-it
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "model_type": "gemma3_text",
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16",
        "vocab_size": 262144,
    },
}


def test_published_phi4_mini_config(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    (folder / "config.json").write_text(json.dumps(PUBLISHED_CONFIGS["phi-4-mini"]))
    config = ModelConfig.from_folder(folder)
    rope = config.rope
    assert (config.head_dim, rope.partial_rotary_factor, rope.type) == (128, 0.75, "longrope")
    assert rope.long_factor == tuple(PHI4_MINI_LONG_FACTOR) and rope.original_max_position_embeddings == 4096
    assert rope.attention_factor == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)
    assert config.tie_word_embeddings and config.fused_checkpoint and config.dtype == "bfloat16"
    assert config.layer_sliding_windows == (262144,) * 32


def test_published_gemma3_1b_config(tiny_model_dir, tmp_path):
    folder = editable_copy(tiny_model_dir("llama"), tmp_path)
    (folder / "config.json").write_text(json.dumps(PUBLISHED_CONFIGS["gemma-3-1b"]))
    config = ModelConfig.from_folder(folder)
    assert config.layer_sliding_windows == ((512,) * 5 + (None,)) * 4 + (512, 512)
    assert {rope.theta for rope in config.layer_ropes[:5]} == {10000.0} and config.layer_ropes[5].theta == 1e6
    assert config.attention_scale == 256**-0.5 and config.final_logit_softcap is None
    assert config.eos_token_ids == {1, 106, 2}  # 2 from the tiny folder's generation_config.json
