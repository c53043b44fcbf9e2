"""FP8 checkpoints (quant_method "fp8", as transformers' FineGrainedFP8 writes them): float8 e4m3
weights with a ``weight_scale_inv`` per block, dequantized at load.

The reference is the same model with the dequantized weights written out in float32: pied must give
identical logits from either folder, and those equal transformers' on the dequantized folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from step_plans import BlockAllocator, Chunk, all_row_logits, make_plan
from test_model import BLOCK_SIZE, NUM_BLOCKS, assert_close, hf_logits, make_runner, random_tokens
from tiny_models import load_hf_model

from workers.executor.weights import dequantize_fp8
from workers.model_config import ModelConfig, ModelFolderError

pytestmark = pytest.mark.slow  # whole-model logits, several models per test

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
# Blocks that do not divide the weights (96x64 q_proj, 128x64 gate/up...): partial last tiles.
BLOCK = [20, 24]


def quantize(weight: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale_inv) with one scale per block (per tensor when block is None)."""
    if block is None:
        scale = weight.abs().max() / FP8_MAX
        return (weight / scale).to(torch.float8_e4m3fn), scale.reshape(1)
    rows, columns = weight.shape
    grid = (-(-rows // block[0]), -(-columns // block[1]))
    scale = torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale[i, j] = tile.abs().max() / FP8_MAX
    expanded = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :columns]
    return (weight / expanded).to(torch.float8_e4m3fn), scale


def write_fp8_folders(source, tmp_path, block: list[int] | None):
    """(FP8 folder, the same weights dequantized in float32, unquantized folder) from ``source``."""
    fp8, dequantized = tmp_path / "fp8", tmp_path / "dequantized"
    for folder in (fp8, dequantized):
        shutil.copytree(source, folder)
    with safe_open(source / "model.safetensors", framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    quantized, plain = {}, {}
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            weight, scale_inv = quantize(tensor, block)
            quantized |= {name: weight, name + "_scale_inv": scale_inv}
            plain[name] = dequantize_fp8(weight, scale_inv, tuple(block or (0, 0)), fp8, name)
        else:
            quantized[name] = plain[name] = tensor
    save_file(quantized, fp8 / "model.safetensors")
    save_file(plain, dequantized / "model.safetensors")
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": block,
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, dequantized


@pytest.mark.parametrize("block", [BLOCK, None], ids=["blocks", "per-tensor"])
@pytest.mark.parametrize("arch", ["qwen3", "phi3"])  # separate and fused (qkv_proj, gate_up_proj) tensors
def test_fp8_checkpoint_equals_its_dequantized_weights(tiny_model_dir, tmp_path, arch, block):
    fp8, dequantized = write_fp8_folders(tiny_model_dir(arch), tmp_path, block)
    assert ModelConfig.from_folder(fp8).fp8_block_size == tuple(block or (0, 0))
    tokens = random_tokens(19, seed=21)
    plan = make_plan([Chunk("a", tokens, 0, BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=21).allocate(19))])
    logits = all_row_logits(make_runner(fp8), plan)
    assert_close(logits, all_row_logits(make_runner(dequantized), plan), 0.0)
    assert_close(logits, hf_logits(load_hf_model(dequantized), tokens))
    # The quantization is real: the original weights give other logits.
    assert (logits - all_row_logits(make_runner(tiny_model_dir(arch)), plan)).abs().max().item() > 1e-4


def test_fp8_scales_of_the_wrong_shape_are_a_clear_error(tiny_model_dir, tmp_path):
    fp8, _ = write_fp8_folders(tiny_model_dir("qwen3"), tmp_path, BLOCK)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelFolderError, match=r"q_proj.weight_scale_inv has shape \[5, 3\], but a 96x64 weight"
    ):
        make_runner(fp8)


def test_fp8_weights_without_scales_are_a_clear_error(tiny_model_dir, tmp_path):
    fp8, _ = write_fp8_folders(tiny_model_dir("qwen3"), tmp_path, BLOCK)
    with safe_open(fp8 / "model.safetensors", framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if not name.endswith("_scale_inv")}
    save_file(tensors, fp8 / "model.safetensors")
    with pytest.raises(ModelFolderError, match="is FP8 but has no .*weight_scale_inv"):
        make_runner(fp8)
