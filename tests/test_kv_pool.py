"""The flat page pool: sizing, page indexing, and that the runner's K/V land where the layout says."""

from __future__ import annotations

import pytest
import torch
from step_plans import Chunk, make_plan
from tiny_models import load_hf_model

from proto.config import EngineConfig
from workers.executor.kv_pool import GIB, KVPool, kv_bytes_per_block, num_blocks_that_fit
from workers.executor.runner import ModelRunner


def test_sizing_helpers():
    # 2 layers x (K, V) x 16 tokens x 2 heads x 16 dims x 4 bytes
    assert kv_bytes_per_block(2, 16, 2, 16, torch.float32) == 2 * 2 * 16 * 2 * 16 * 4
    assert kv_bytes_per_block(2, 16, 2, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 16 * 2
    assert num_blocks_that_fit(GIB, 8192) == GIB // 8192
    assert num_blocks_that_fit(8191, 8192) == 0


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
