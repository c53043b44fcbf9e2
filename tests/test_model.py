"""The model through the runner's forward path against transformers on the same weights (fp32).

Prefill, decode through the paged cache, chunked prefill and mixed batches must all give the
logits transformers gives for the same tokens; block placement in the pool must not matter.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from step_plans import BlockAllocator, Chunk, all_row_logits, make_plan
from tiny_models import PHI3_LONGROPE, load_hf_model

from proto.config import EngineConfig
from workers.executor.runner import ModelRunner

TOLERANCE = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 64
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
VARIANTS = {
    "llama": dict(arch="llama"),
    "qwen2-sharded": dict(arch="qwen2", sharded=True),
    "qwen2-sliding-layer": dict(arch="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "mistral-window": dict(arch="mistral", sliding_window=5),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "llama3-rope-old-format": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied-embeddings": dict(arch="llama", tie_word_embeddings=True),
    "mha": dict(arch="llama", num_key_value_heads=4),
    "qwen3": dict(arch="qwen3"),
    "qwen3-bias-sliding-layer": dict(
        arch="qwen3", attention_bias=True, use_sliding_window=True, sliding_window=5, max_window_layers=1
    ),
    "gemma3": dict(arch="gemma3"),
    "gemma3-old-format": dict(arch="gemma3"),
    "gemma3-no-softcap-untied": dict(arch="gemma3", final_logit_softcapping=None, tie_word_embeddings=False),
    "phi3": dict(arch="phi3"),
    "phi3-sliding": dict(arch="phi3", sliding_window=5, partial_rotary_factor=0.75),
    # Original context past every sequence here: the short factors and the attention factor.
    "phi3-longrope-short": dict(
        arch="phi3", rope_parameters=PHI3_LONGROPE, original_max_position_embeddings=64
    ),
    "smollm3": dict(arch="smollm3"),
    # Config keys that these architectures' transformers classes ignore, so must we: a partial
    # rotary factor (only Phi-3 reads it), Mistral's attention_bias, Qwen2's unused window of 0.
    "llama-partial-rotary-key": dict(arch="llama", partial_rotary_factor=0.5),
    "qwen3-partial-rotary-key": dict(arch="qwen3", partial_rotary_factor=0.5),
    "mistral-attention-bias-key": dict(arch="mistral", attention_bias=True),
    "qwen2-unused-window-zero": dict(arch="qwen2", use_sliding_window=False, sliding_window=0),
    "gemma3-multimodal-folder": dict(arch="gemma3-multimodal"),  # its text model
}
# The architectures' fixtures that the batching and placement tests run on.
BATCHING_MODELS = ["llama", "mistral-window", "qwen3", "gemma3", "phi3", "smollm3"]


def make_runner(path, **overrides) -> ModelRunner:
    settings = dict(
        model=str(path), dtype="float32", device="cpu", block_size=BLOCK_SIZE, device_kv_blocks=NUM_BLOCKS
    )
    return ModelRunner(EngineConfig(**(settings | overrides)).validate())


def to_old_rope_format(path, tmp_path):
    """A copy of the folder whose config.json uses transformers 4's rope_theta + rope_scaling."""
    folder = shutil.copytree(path, tmp_path / "old-format")
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def to_old_gemma3_format(path, tmp_path):
    """A copy of a Gemma 3 folder with transformers 4's keys: rope_theta, rope_local_base_freq and
    rope_scaling (global layers only) instead of nested rope_parameters, and sliding_window_pattern
    instead of layer_types."""
    folder = shutil.copytree(path, tmp_path / "old-gemma3")
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    config["rope_theta"] = rope["full_attention"].pop("rope_theta")
    config["rope_scaling"] = rope["full_attention"]
    assert config.pop("layer_types") == ["sliding_attention", "full_attention"]
    config["sliding_window_pattern"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """``built(variant name)`` -> (runner, transformers model), once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            kwargs = dict(VARIANTS[name])
            arch = kwargs.pop("arch")
            path = tiny_model_dir(arch, **kwargs)
            if name.endswith("old-format"):
                convert = to_old_gemma3_format if arch == "gemma3" else to_old_rope_format
                path = convert(path, tmp_path_factory.mktemp("old-format"))
            cache[name] = make_runner(path), load_hf_model(path)
        return cache[name]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, built):
    return built(request.param)


@pytest.fixture(scope="module")
def llama(built):
    return built("llama")


def random_tokens(count: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 512, size=count).tolist()


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def assert_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert ours.shape == reference.shape
    difference = (ours - reference).abs().max().item()
    assert difference <= tolerance, f"max abs logit difference {difference:.2e} > {tolerance:.0e}"


def test_prefill_matches_transformers(variant):
    runner, hf_model = variant
    tokens = random_tokens(21, seed=1)
    blocks = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=1).allocate(len(tokens))
    logits = all_row_logits(runner, make_plan([Chunk("a", tokens, 0, blocks)]))
    assert_close(logits, hf_logits(hf_model, tokens))


def test_decode_matches_transformers(variant):
    runner, hf_model = variant
    tokens = random_tokens(22, seed=2)
    reference = hf_logits(hf_model, tokens)
    blocks = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=2).allocate(len(tokens))
    prefill = runner.compute_logits(make_plan([Chunk("a", tokens[:9], 0, blocks[:3])]))
    assert_close(prefill, reference[8:9])
    for position in range(9, len(tokens)):
        table = blocks[: position // BLOCK_SIZE + 1]
        logits = runner.compute_logits(
            make_plan([Chunk("a", tokens[position : position + 1], position, table)])
        )
        assert_close(logits, reference[position : position + 1])


@pytest.mark.parametrize("model", BATCHING_MODELS)
def test_chunked_prefill_matches_one_shot(model, built):
    runner, hf_model = built(model)
    tokens = random_tokens(23, seed=3)
    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=3)
    one_shot = all_row_logits(runner, make_plan([Chunk("a", tokens, 0, allocator.allocate(len(tokens)))]))
    blocks = allocator.allocate(len(tokens))
    chunked = []
    for start, end in [(0, 7), (7, 16), (16, 23)]:
        table = blocks[: -(-end // BLOCK_SIZE)]
        chunked.append(all_row_logits(runner, make_plan([Chunk("b", tokens[start:end], start, table)])))
    assert_close(torch.cat(chunked), one_shot, 1e-5)
    assert_close(torch.cat(chunked), hf_logits(hf_model, tokens))


@pytest.mark.parametrize("model", BATCHING_MODELS)
def test_mixed_batch_matches_each_alone(model, built):
    runner, hf_model = built(model)
    prompts = {
        name: random_tokens(length, seed=10 + i)
        for i, (name, length) in enumerate(zip("abcd", (13, 10, 11, 21)))
    }
    # (request, tokens already cached, tokens scheduled in the mixed step, sampled)
    layout = [("a", 0, 13, True), ("b", 9, 1, True), ("c", 5, 6, False), ("d", 20, 1, True)]

    def run(batched: bool, seed: int) -> dict[str, torch.Tensor]:
        allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=seed)
        blocks = {name: allocator.allocate(len(prompts[name])) for name in prompts}
        chunks = []
        for name, cached, count, sample in layout:
            if cached:  # prefill what the mixed step assumes is already in the cache
                runner.compute_logits(make_plan([Chunk(name, prompts[name][:cached], 0, blocks[name])]))
            end = cached + count
            chunks.append(
                Chunk(name, prompts[name][cached:end], cached, blocks[name][: -(-end // BLOCK_SIZE)], sample)
            )
        if batched:
            rows = all_row_logits(runner, make_plan(chunks)).split([count for _, _, count, _ in layout])
            return {name: logits for (name, *_), logits in zip(layout, rows)}
        return {chunk.request_id: all_row_logits(runner, make_plan([chunk])) for chunk in chunks}

    mixed, alone = run(batched=True, seed=4), run(batched=False, seed=5)
    for name, cached, count, _ in layout:
        assert_close(mixed[name], alone[name], 1e-5)
        assert_close(mixed[name], hf_logits(hf_model, prompts[name])[cached : cached + count])


def test_sampled_rows_only_in_plan_order(llama):
    runner, hf_model = llama
    a, b = random_tokens(9, seed=6), random_tokens(6, seed=7)
    allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=6)
    plan = make_plan(
        [
            Chunk("a", a, 0, allocator.allocate(len(a))),
            Chunk("b", b[:4], 0, allocator.allocate(len(b)), sample=False),
        ]
    )
    logits = runner.compute_logits(plan)
    assert_close(logits, hf_logits(hf_model, a)[-1:])


@pytest.mark.parametrize("model", BATCHING_MODELS)
@pytest.mark.parametrize("order", ["reversed", "interleaved"])
def test_block_placement_does_not_matter(model, built, order):
    runner, hf_model = built(model)
    tokens = random_tokens(22, seed=8)
    num_blocks = -(-len(tokens) // BLOCK_SIZE)
    contiguous = list(range(num_blocks))
    placed = list(range(NUM_BLOCKS - 1, NUM_BLOCKS - 1 - num_blocks, -1))
    if order == "interleaved":
        placed = [2 * i + 20 for i in range(num_blocks)][::-1]
    results = []
    for blocks in (contiguous, placed):
        # Large values everywhere first: only pages the table names (and only live slots) may be read.
        runner.kv_pool.pages.normal_(0, 1000)
        runner.compute_logits(make_plan([Chunk("a", tokens[:13], 0, blocks[:4])]))
        decode_plan = make_plan([Chunk("a", tokens[13:14], 13, blocks[:4])])
        results.append(torch.cat([runner.compute_logits(decode_plan), all_row_logits(runner, decode_plan)]))
    assert_close(results[0], results[1], 1e-6)
    assert_close(results[1][:1], hf_logits(hf_model, tokens[:14])[13:14])


@pytest.mark.parametrize("model", ["llama", "gemma3", "phi3"])
def test_bfloat16_runs_close_to_float32(tiny_model_dir, built, model):
    runner32, _ = built(model)
    kwargs = dict(VARIANTS[model])
    runner16 = make_runner(tiny_model_dir(kwargs.pop("arch"), **kwargs), dtype="bfloat16")
    assert runner16.kv_pool.pages.dtype == torch.bfloat16
    assert runner16.model.embed_tokens.dtype == torch.bfloat16
    tokens = random_tokens(17, seed=9)
    blocks = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=9).allocate(len(tokens))
    plan = make_plan([Chunk("a", tokens, 0, blocks)])
    logits16, logits32 = all_row_logits(runner16, plan), all_row_logits(runner32, plan)
    assert logits16.dtype == torch.float32 and logits16.shape == logits32.shape
    assert torch.isfinite(logits16).all()
    scale = logits32.abs().max().item()
    assert (logits16 - logits32).abs().max().item() < 0.1 * scale
    assert (logits16.argmax(-1) == logits32.argmax(-1)).float().mean() >= 0.8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("model", ["qwen2-sharded", "qwen3", "gemma3", "phi3", "smollm3"])
def test_cuda_matches_transformers(tiny_model_dir, model):
    kwargs = dict(VARIANTS[model])
    path = tiny_model_dir(kwargs.pop("arch"), **kwargs)
    runner = make_runner(path, device="cuda", device_kv_blocks=None, gpu_memory_utilization=0.05)
    assert runner.kv_pool.pages.is_cuda and runner.num_device_blocks > NUM_BLOCKS
    tokens = random_tokens(22, seed=11)
    reference = hf_logits(load_hf_model(path), tokens)
    blocks = BlockAllocator(runner.num_device_blocks, BLOCK_SIZE, seed=11).allocate(len(tokens))
    prefill = all_row_logits(runner, make_plan([Chunk("a", tokens[:15], 0, blocks[:4])]))
    decode = runner.compute_logits(make_plan([Chunk("a", tokens[15:16], 15, blocks[:4])]))
    assert_close(torch.cat([prefill, decode]).cpu(), reference[:16])


def test_longrope_switches_factors_as_transformers_does(tiny_model_dir):
    """Original context 16: a 10-token prefill uses the short factors and each decode from position 16
    on the long ones, exactly as transformers' forward passes over a cache do."""
    from transformers import DynamicCache

    path = tiny_model_dir("phi3", rope_parameters=PHI3_LONGROPE, original_max_position_embeddings=16)
    runner, hf_model = make_runner(path), load_hf_model(path)
    tokens = random_tokens(24, seed=12)
    cache = DynamicCache(config=hf_model.config)
    with torch.no_grad():
        steps = [hf_model(torch.tensor([tokens[:10]]), cache=cache, use_cache=True).logits[0]]
        for position in range(10, len(tokens)):
            steps.append(hf_model(torch.tensor([tokens[position : position + 1]]), cache=cache).logits[0])
    reference = torch.cat(steps)
    # The switch matters: one pass over all 24 tokens (long factors throughout) gives other logits.
    assert (reference - hf_logits(hf_model, tokens)).abs().max().item() > 1e-2

    blocks = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=12).allocate(len(tokens))
    ours = [all_row_logits(runner, make_plan([Chunk("a", tokens[:10], 0, blocks[:3])]))]
    for position in range(10, len(tokens)):
        table = blocks[: position // BLOCK_SIZE + 1]
        ours.append(
            runner.compute_logits(make_plan([Chunk("a", tokens[position : position + 1], position, table)]))
        )
    assert_close(torch.cat(ours), reference)
