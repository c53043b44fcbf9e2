"""Pieces every paged attention kernel shares: reading a tile of keys through the page table, and
one step of the online softmax.

A key tile is ``TILE_N`` consecutive positions of one sequence. Each position's page is looked up
in the sequence's row of the per-layer page table (``position // BLOCK_SIZE``) and read in place,
so a tile may span several pages or part of one, whatever the block size: nothing is gathered.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def load_kv_tile(
    pool_ptr,
    page_row_ptr,  # this sequence's row of the page table
    keys,  # [TILE_N] positions
    key_mask,  # [TILE_N] positions that exist
    kv_head,
    dims,  # [BLOCK_D]
    dim_mask,
    stride_pool_page,
    stride_pool_kv,
    stride_pool_token,
    stride_pool_head,
    BLOCK_SIZE: tl.constexpr,
):
    """``([TILE_N, BLOCK_D], [TILE_N, BLOCK_D])`` K and V of ``keys``, zero where masked."""
    pages = tl.load(page_row_ptr + keys // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
    offsets = (keys % BLOCK_SIZE).to(tl.int64)
    pointers = (
        pool_ptr
        + pages[:, None] * stride_pool_page
        + offsets[:, None] * stride_pool_token
        + kv_head * stride_pool_head
        + dims[None, :]
    )
    mask = key_mask[:, None] & dim_mask[None, :]
    k = tl.load(pointers, mask=mask, other=0.0)
    v = tl.load(pointers + stride_pool_kv, mask=mask, other=0.0)
    return k, v


@triton.jit
def online_softmax_step(
    q,  # [M, BLOCK_D]
    k,  # [TILE_N, BLOCK_D]
    v,  # [TILE_N, BLOCK_D]
    allowed,  # [M, TILE_N] which (row, key) pairs attend
    m,  # [M] running max, in log2 units (-inf before any key)
    row_sum,  # [M] running sum of exp2(score - m)
    acc,  # [M, BLOCK_D] float32 running sum of p @ v
    qk_scale,  # softmax scale * log2(e)
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # see dot_upcast
):
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    # A row that has seen no key yet keeps max -inf: subtract 0 instead, so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_safe[:, None])
    alpha = tl.math.exp2(m - m_safe)
    row_sum = row_sum * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, row_sum, acc


def dot_precision(dtype) -> str:
    """fp32 models get IEEE fp32 products (TF32 would break exactness against transformers)."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def dot_upcast(dtype) -> bool:
    """Whether the dots take bfloat16 operands as float32: Triton's interpreter (3.9) multiplies
    bfloat16 tiles as raw integers, so there they are widened first. Every bfloat16 value is exact
    in float32 (and in TF32), so the products and float32 sums are the same as a bfloat16 MMA's;
    on a GPU the dots stay bfloat16."""
    import torch

    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def block_d(head_dim: int) -> int:
    """Head dims are padded (masked) to a power of two, at least 16 (tl.dot's smallest K on GPUs)."""
    return max(16, triton.next_power_of_2(head_dim))
