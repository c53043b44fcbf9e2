"""The flat page pool: sizing, page indexing, and that the runner's K/V land where the layout says."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from step_plans import Chunk, make_plan
from tiny_models import load_hf_model

from proto.config import ConfigError, EngineConfig
from workers.executor.kv_pool import (
    GIB,
    DeviceMemoryProfile,
    KVPool,
    kv_bytes_per_block,
    num_blocks_that_fit,
    num_profiled_kv_blocks,
)
from workers.executor.runner import ModelRunner


def test_sizing_helpers():
    # 2 layers x (K, V) x 16 tokens x 2 heads x 16 dims x 4 bytes
    assert kv_bytes_per_block(2, 16, 2, 16, torch.float32) == 2 * 2 * 16 * 2 * 16 * 4
    assert kv_bytes_per_block(2, 16, 2, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 16 * 2
    assert num_blocks_that_fit(GIB, 8192) == GIB // 8192
    assert num_blocks_that_fit(8191, 8192) == 0


def test_pool_size_from_profile():
    """--gpu-memory-utilization is a fraction of the whole device; weights, the largest step's
    activations, the graph pool and the staging ring come off it before the KV blocks."""
    profile = DeviceMemoryProfile(
        total=80 * GIB, weights=16 * GIB, peak_activations=3 * GIB, graph_pool=GIB, free=64 * GIB
    )
    block = 2 * 1024 * 1024
    # 0.9 * 80 = 72 GiB; 72 - 16 - 3 - 1 - 0.5 (staging) = 51.5 GiB of 2 MiB blocks.
    assert num_profiled_kv_blocks(profile, 0.9, GIB // 2, block) == int(51.5 * GIB) // block
    assert num_profiled_kv_blocks(profile, 0.5, 0, block) == (40 - 20) * GIB // block
    # More activations leave fewer blocks, one for one.
    bigger = replace(profile, peak_activations=3 * GIB + 10 * block)
    assert (
        num_profiled_kv_blocks(bigger, 0.9, 0, block) == num_profiled_kv_blocks(profile, 0.9, 0, block) - 10
    )
    # Another process holds 30 GiB: only what is free counts (34 GiB after the weights).
    shared = replace(profile, free=34 * GIB)
    assert num_profiled_kv_blocks(shared, 0.9, 0, block) == (34 - 3 - 1) * GIB // block
    with pytest.raises(ConfigError, match="activations at --max-num-batched-tokens"):
        num_profiled_kv_blocks(profile, 0.25, 0, block)  # 20 GiB < 16 + 3 + 1 + a block


def test_dummy_forward_of_the_largest_step(tiny_model_dir):
    """The profiling step runs through the real forward pass (here on CPU): logits for every
    sequence, uneven splits included."""
    path = tiny_model_dir("llama")
    runner = ModelRunner(
        EngineConfig(model=str(path), dtype="float32", device="cpu", block_size=4, device_kv_blocks=10)
    )
    logits = runner.dummy_forward(num_tokens=37, num_seqs=5)
    assert logits.shape == (5, runner.model_config.vocab_size) and torch.isfinite(logits).all()
    assert runner.dummy_forward(num_tokens=3, num_seqs=3).shape[0] == 3


def test_pool_shape_and_page_indexing():
    pool = KVPool(3, 5, 4, 2, 8, torch.float32, "cpu", num_extra_pages=2)
    assert pool.pages.shape == (3 * 5 + 2, 2, 4, 2, 8)
    assert pool.num_device_pages == 15 and pool.extra_pages.shape[0] == 2
    assert pool.layer_page_offset(2) == 10
    assert pool.pages.abs().sum() == 0  # zeroed: never-written slots are finite
    pool.layer_pages(1)[3].fill_(1)
    assert pool.pages[1 * 5 + 3].eq(1).all() and pool.pages.sum() == pool.pages[8].numel()
    assert pool.nbytes == pool.pages.numel() * 4
    with pytest.raises(ValueError):
        KVPool(3, 0, 4, 2, 8, torch.float32, "cpu")


def test_runner_writes_kv_at_layer_pages(tiny_model_dir):
    """After a prefill, page ``l * D + b`` holds layer l's K/V (post-RoPE) as transformers caches them."""
    path = tiny_model_dir("llama")
    runner = ModelRunner(
        EngineConfig(model=str(path), dtype="float32", device="cpu", block_size=4, device_kv_blocks=10)
    )
    tokens, blocks = list(range(5, 15)), [8, 1, 6]
    runner.compute_logits(make_plan([Chunk("a", tokens, 0, blocks)]))
    with torch.no_grad():
        cache = load_hf_model(path)(torch.tensor([tokens]), use_cache=True).past_key_values
    num_blocks = runner.num_device_blocks
    for layer in range(runner.model_config.num_layers):
        for position in range(len(tokens)):
            page = runner.kv_pool.pages[layer * num_blocks + blocks[position // 4]]
            for kv, expected in enumerate((cache.layers[layer].keys, cache.layers[layer].values)):
                torch.testing.assert_close(
                    page[kv, position % 4], expected[0, :, position], atol=1e-5, rtol=1e-5
                )
