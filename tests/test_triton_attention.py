"""Triton paged attention (``workers/executor/triton_attention``) against the torch backend, run in
Triton's interpreter on CPU (conftest sets ``TRITON_INTERPRET=1`` before triton is imported), and
end to end: greedy tokens with ``attention_backend="triton"`` equal transformers'.

The K/V write moves the same values, so it must be bit-for-bit. Attention sums in another order
(online softmax over key tiles, exp2, split-K) than SDPA, so it must agree within ``TOLERANCE``
per dtype, on values of order one (random q, k, v ~ N(0, 1)).

The interpreter runs one program at a time in Python: the default run keeps a small subset; the
rest is marked ``triton_full`` (``TRITON_INTERPRET=1 pytest -m triton_full tests/test_triton_attention.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine import MODEL_VARIANTS, PROMPTS, assert_prefix_equal, hf_greedy
from tiny_models import build_model_dir, load_hf_model

pytest.importorskip("triton")

from pied import LLM, SamplingParams  # noqa: E402
from proto.config import ConfigError, EngineConfig  # noqa: E402
from workers.executor.attention import (  # noqa: E402
    AttentionMetadata,
    StepLayout,
    TorchPagedAttention,
    make_attention_backend,
)
from workers.executor.kv_pool import StagingRing  # noqa: E402
from workers.executor.triton_attention import (  # noqa: E402
    TritonPagedAttention,
    decode_attention,
    varlen_attention,
    write_kv,
)

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAST = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FULL = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def paged_batches(draw, decode_only: bool = False, head_dims=(16, 24, 64), device: str = "cpu"):
    """A random step over a random pool: shapes, block placement (device blocks of a random layer,
    and host blocks through their staging slots), query/context lengths, window and dtype."""
    block_size = draw(st.sampled_from([1, 4, 8, 16]))
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    group_size = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from(head_dims))
    dtype = draw(st.sampled_from(DTYPES))
    num_seqs = draw(st.integers(1, 4))
    if decode_only:
        query_lens = [1] * num_seqs
    else:
        query_lens = draw(st.lists(st.integers(1, 24), min_size=num_seqs, max_size=num_seqs))
    starts = draw(st.lists(st.integers(0, 80), min_size=num_seqs, max_size=num_seqs))
    num_blocks = [-(-(q + s) // block_size) for q, s in zip(query_lens, starts)]
    num_layers = 2
    # Device blocks plus spare ids, so a table reaches a random subset in a random order.
    num_device_blocks = sum(num_blocks) + draw(st.integers(0, 8))
    use_host = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if use_host:
        # Some of the step's blocks are host blocks (ids >= D), read through the staging ring.
        ids = rng.permutation(num_device_blocks + sum(num_blocks))[: sum(num_blocks)]
        staging = StagingRing(num_layers * num_device_blocks, 2, sum(num_blocks))
    else:
        ids = rng.permutation(num_device_blocks)[: sum(num_blocks)]
        staging = None
    layout = StepLayout.build(
        np.array(query_lens), np.array(starts), np.array(num_blocks), ids, block_size, num_device_blocks, staging
    )
    meta, _ = AttentionMetadata.from_layout(layout, torch.device(device))
    num_pages = num_layers * num_device_blocks + (staging.num_pages if staging else 0)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(num_pages, 2, block_size, num_kv_heads, head_dim, generator=generator).to(device, dtype)
    q = torch.randn(meta.num_tokens, num_kv_heads * group_size, head_dim, generator=generator).to(device, dtype)
    window = draw(st.one_of(st.none(), st.integers(1, 40)))
    layer = draw(st.integers(0, num_layers - 1))
    return meta, pool, q, window, layer


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    difference = (ours.float() - reference.float()).abs().max().item()
    assert difference <= TOLERANCE[ours.dtype], f"{ours.dtype}: max abs difference {difference:.2e}"


def check_write_kv(batch) -> None:
    meta, pool, _, _, layer = batch
    generator = torch.Generator().manual_seed(meta.num_tokens)
    shape = (meta.num_tokens, *pool.shape[3:])
    # v as a strided view (as the model's fused projection gives it), k contiguous.
    k = torch.randn(shape, generator=generator).to(pool.device, pool.dtype)
    v = torch.randn(meta.num_tokens, 2, *pool.shape[3:], generator=generator).to(pool.device, pool.dtype)[:, 1]
    expected, ours = pool.clone(), pool.clone()
    TorchPagedAttention().write_kv(expected, k, v, meta.slot_pages(layer), meta)
    write_kv(ours, k, v, meta.slot_pages(layer), meta.slot_offsets, block_t=4)
    assert torch.equal(ours, expected)


def check_attend(batch, tile_n: int) -> None:
    meta, pool, q, window, layer = batch
    page_table = meta.page_table(layer)
    expected = TorchPagedAttention().attend(q, pool, page_table, meta, window)
    ours = varlen_attention(
        q,
        pool,
        page_table,
        meta.query_start_loc,
        meta.context_lens,
        meta.max_query_len,
        window,
        rows_per_program=16,
        tile_n=tile_n,
    )
    assert_close(ours, expected)


def check_decode(batch, num_splits: int, tile_n: int) -> None:
    meta, pool, q, window, layer = batch
    page_table = meta.page_table(layer)
    expected = TorchPagedAttention().attend(q, pool, page_table, meta, window)
    ours = decode_attention(q, pool, page_table, meta.context_lens, window, num_splits, tile_n=tile_n)
    assert_close(ours, expected)


@FAST
@given(paged_batches())
def test_write_kv_is_bit_exact(batch):
    check_write_kv(batch)


@FAST
@given(paged_batches(), st.sampled_from([16, 32]))
def test_varlen_attention_matches_torch(batch, tile_n):
    check_attend(batch, tile_n)


@FAST
@given(paged_batches(decode_only=True), st.integers(1, 5), st.sampled_from([16, 32]))
def test_decode_attention_matches_torch(batch, num_splits, tile_n):
    check_decode(batch, num_splits, tile_n)


@pytest.mark.triton_full
@FULL
@given(paged_batches(head_dims=(16, 64, 80, 96, 128, 256)))
def test_write_kv_is_bit_exact_full(batch):
    check_write_kv(batch)


@pytest.mark.triton_full
@FULL
@given(paged_batches(head_dims=(16, 64, 80, 96, 128, 256)), st.sampled_from([16, 32, 64]))
def test_varlen_attention_matches_torch_full(batch, tile_n):
    check_attend(batch, tile_n)


@pytest.mark.triton_full
@FULL
@given(
    paged_batches(decode_only=True, head_dims=(16, 64, 80, 96, 128, 256)),
    st.integers(1, 16),
    st.sampled_from([16, 32, 64]),
)
def test_decode_attention_matches_torch_full(batch, num_splits, tile_n):
    check_decode(batch, num_splits, tile_n)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@FULL
@given(
    paged_batches(head_dims=(64, 80, 128, 256), device="cuda"),
    paged_batches(decode_only=True, head_dims=(64, 128, 256), device="cuda"),
    st.integers(1, 16),
)
def test_kernels_compiled_for_cuda_match_torch(batch, decode_batch, num_splits):
    """The same checks with the kernels compiled for the GPU (the interpreter is off with CUDA)."""
    check_write_kv(batch)
    check_attend(batch, tile_n=64 if batch[1].shape[-1] <= 128 else 32)
    check_decode(decode_batch, num_splits, tile_n=64 if decode_batch[1].shape[-1] <= 128 else 32)


def test_backend_routes_decode_and_mixed_steps():
    """The backend through the PagedAttention protocol: a decode step, then a mixed step (decodes,
    a chunk of a prefill and a whole prefill in one batch), both against torch."""
    rng = np.random.default_rng(3)
    block_size, num_device_blocks = 4, 64
    for query_lens, starts in (([1, 1, 1], [30, 2, 61]), ([1, 9, 1, 20], [17, 12, 40, 0])):
        num_blocks = [-(-(q + s) // block_size) for q, s in zip(query_lens, starts)]
        ids = rng.permutation(num_device_blocks)[: sum(num_blocks)]
        layout = StepLayout.build(
            np.array(query_lens), np.array(starts), np.array(num_blocks), ids, block_size, num_device_blocks
        )
        meta, _ = AttentionMetadata.from_layout(layout, torch.device("cpu"))
        pool = torch.randn(2 * num_device_blocks, 2, block_size, 2, 32)
        q = torch.randn(meta.num_tokens, 6, 32)
        k, v = torch.randn(2, meta.num_tokens, 2, 32)
        expected_pool, ours_pool = pool.clone(), pool.clone()
        reference, backend = TorchPagedAttention(), TritonPagedAttention(num_splits=3, tile_n=16)
        reference.write_kv(expected_pool, k, v, meta.slot_pages(1), meta)
        backend.write_kv(ours_pool, k, v, meta.slot_pages(1), meta)
        assert torch.equal(ours_pool, expected_pool)
        for window in (None, 5):
            expected = reference.attend(q, expected_pool, meta.page_table(1), meta, window)
            assert_close(backend.attend(q, ours_pool, meta.page_table(1), meta, window), expected)


@pytest.mark.e2e
def test_backend_selection(tiny_model_dir, monkeypatch):
    assert EngineConfig().resolved_attention_backend("cpu") == "torch"
    assert EngineConfig().resolved_attention_backend("cuda") == "triton"
    assert EngineConfig(attention_backend="torch").resolved_attention_backend("cuda") == "torch"
    with pytest.raises(ConfigError, match="--attention-backend must be"):
        EngineConfig(attention_backend="flash").validate()
    assert isinstance(make_attention_backend("triton", torch.device("cpu")), TritonPagedAttention)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        make_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        LLM(model=str(tiny_model_dir("llama")), attention_backend="triton", device_kv_blocks=8)


# ---------------------------------------------------------------- end to end

MAX_TOKENS = 16
E2E_VARIANTS = MODEL_VARIANTS | {
    "mistral-window": dict(arch="mistral", sliding_window=5),
    "qwen2-sliding-layer": dict(arch="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1),
}
# Device budget: 24 blocks of 4 tokens for requests of up to 24 blocks each, so most of the batch's
# KV lives on host and is streamed through the staging ring (see test_pooling.py). Pools stay small:
# the interpreter copies every tensor argument back after each launch.
POLICIES = {"device": dict(device_kv_blocks=128), "pie": dict(device_kv_blocks=24, kv_policy="pie", expansion="fixed:96")}
DEFAULT_CASES = {("llama", "device"), ("mistral-window", "pie")}


def e2e_cases():
    for variant in E2E_VARIANTS:
        for policy in POLICIES:
            marks = () if (variant, policy) in DEFAULT_CASES else (pytest.mark.triton_full,)
            yield pytest.param(variant, policy, marks=marks, id=f"{variant}-{policy}")


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])


@pytest.mark.e2e
@pytest.mark.parametrize("variant,policy", list(e2e_cases()))
def test_greedy_tokens_match_transformers(tmp_path, variant, policy, device="cpu"):
    options = dict(E2E_VARIANTS[variant])
    path = build_model_dir(tmp_path, options.pop("arch"), **options)
    reference_model = load_hf_model(path)
    llm = LLM(
        model=str(path),
        dtype="float32",
        device=device,
        block_size=4,
        attention_backend="triton",
        **POLICIES[policy],
    )
    assert llm.engine.actor("executor").runner.attention_backend == "triton"
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs):
        assert_prefix_equal(output.outputs[0].token_ids, hf_greedy(reference_model, prompt, MAX_TOKENS))
    if policy == "pie":
        assert llm.engine.stats().bytes_to_device_total > 0  # host KV was streamed and read in place


@pytest.mark.e2e
@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_tokens_match_transformers_on_cuda(tmp_path, policy, device):
    test_greedy_tokens_match_transformers(tmp_path, "mistral-window", policy, device)
