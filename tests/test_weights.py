"""Loading safetensors weights: single file and shards, dtype conversion, and every failure named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.executor.model import CausalLM
from workers.executor.parallel import ShardedTarget
from workers.executor.weights import load_weights, weight_files
from workers.model_config import ModelConfig, ModelFolderError


def loaded_model(folder, dtype=torch.float32) -> CausalLM:
    model = CausalLM(ModelConfig.from_folder(folder), dtype)
    load_weights(model.checkpoint_targets(), folder)
    return model


def test_every_parameter_comes_from_the_checkpoint(tiny_model_dir):
    folder = tiny_model_dir("llama")
    model = loaded_model(folder)
    tensors = load_file(folder / "model.safetensors")
    targets = model.checkpoint_targets()
    assert set(targets) == set(tensors)
    num_elements = 0
    for name, target in targets.items():
        if isinstance(target, ShardedTarget):  # one rank of one: a single piece, the whole tensor
            assert target.covers_all, name
            target = target.pieces[0][0]
        assert torch.equal(target, tensors[name]), name
        num_elements += target.numel()
    # The fused views cover each fused parameter completely.
    assert sum(p.numel() for p in model.parameters()) == num_elements


def test_sharded_weights_with_index(tiny_model_dir):
    folder = tiny_model_dir("qwen2", sharded=True)
    assert len(weight_files(folder)) > 1
    model = loaded_model(folder)
    assert model.layers[0].self_attn.qkv_proj.bias is not None


def test_tied_checkpoint_has_no_lm_head(tiny_model_dir):
    model = loaded_model(tiny_model_dir("llama", tie_word_embeddings=True))
    assert model.lm_head is None and "lm_head.weight" not in model.checkpoint_targets()


def test_converts_dtype_on_load(tiny_model_dir):
    folder = tiny_model_dir("llama")
    model = loaded_model(folder, torch.bfloat16)
    expected = load_file(folder / "model.safetensors")["model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(model.norm.weight, expected)


def copy_of(tiny_model_dir, tmp_path, **kwargs):
    return shutil.copytree(tiny_model_dir(**kwargs), tmp_path / "model")


def test_corrupt_safetensors(tiny_model_dir, tmp_path):
    folder = copy_of(tiny_model_dir, tmp_path, arch="llama")
    file = folder / "model.safetensors"
    file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\x00" * 64)
    with pytest.raises(ModelFolderError, match=f"{file}: corrupt safetensors file"):
        loaded_model(folder)


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    folder = copy_of(tiny_model_dir, tmp_path, arch="llama")
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ModelFolderError, match=f"{file}: corrupt safetensors file"):
        loaded_model(folder)


def test_missing_tensors_are_named(tiny_model_dir, tmp_path):
    folder = copy_of(tiny_model_dir, tmp_path, arch="llama")
    file = folder / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError) as error:
        loaded_model(folder)
    message = str(error.value)
    assert message.startswith(f"{file}: missing tensors")
    assert "model.layers.1.mlp.up_proj.weight" in message and "model.norm.weight" in message


def test_index_pointing_at_missing_shard(tiny_model_dir, tmp_path):
    folder = copy_of(tiny_model_dir, tmp_path, arch="qwen2", sharded=True)
    shard = weight_files(folder)[-1]
    shard.unlink()
    index = folder / "model.safetensors.index.json"
    with pytest.raises(
        ModelFolderError, match=f"{index}: refers to shard '{shard.name}', which does not exist"
    ):
        loaded_model(folder)


def test_invalid_index(tiny_model_dir, tmp_path):
    folder = copy_of(tiny_model_dir, tmp_path, arch="qwen2", sharded=True)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ModelFolderError, match=f"{index}: not a valid safetensors index"):
        loaded_model(folder)


def test_shape_mismatch_names_tensor_and_file(tiny_model_dir, tmp_path):
    folder = copy_of(tiny_model_dir, tmp_path, arch="llama")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelFolderError,
        match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape",
    ):
        loaded_model(folder)
