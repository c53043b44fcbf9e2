"""Variable-length attention over paged KV: prefill, chunked prefill and mixed batches in one launch.

Every sequence has ``query_len`` new tokens at the end of its ``context_len`` (their K/V already
written into the pool), so a sequence's query ``i`` sits at position ``context_len - query_len + i``
and attends causally (and within the sliding window, if any) to the pool's keys. A decode is the
case ``query_len == 1``, so a mixed batch needs no special handling.

Grid: ``(sequence, query tile, kv head)``. A program's rows are ``BLOCK_Q`` queries times the
``BLOCK_G`` query heads that share the kv head (GQA/MQA; MHA is a group of one), so K/V tiles are
read once per group. Query tiles past a sequence's length return at once (cheap on a GPU; a
precomputed tile list would avoid them for very unequal batches). Keys are visited only up to
the tile's last query and, with a window, from its first query's window start.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.executor.triton_attention.tiles import (
    LOG2_E,
    block_d,
    dot_precision,
    dot_upcast,
    load_kv_tile,
    online_softmax_step,
)


@triton.jit
def _varlen_attention_kernel(
    q_ptr,
    out_ptr,
    pool_ptr,
    page_table_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    qk_scale,
    sliding_window,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_page_table,
    stride_pool_page,
    stride_pool_kv,
    stride_pool_token,
    stride_pool_head,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    query_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    if query_tile * BLOCK_Q >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    first_position = context_len - query_len

    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    query_ids = query_tile * BLOCK_Q + rows // BLOCK_G
    group_ids = rows % BLOCK_G
    row_mask = (query_ids < query_len) & (group_ids < GROUP_SIZE)
    heads = kv_head * GROUP_SIZE + group_ids
    query_positions = first_position + query_ids
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    tokens = (query_start + query_ids).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )

    # Keys this tile can see: up to its last query, and from its first query's window start.
    key_end = first_position + tl.minimum(query_len, (query_tile + 1) * BLOCK_Q)
    key_start = 0
    if HAS_WINDOW:
        key_start = tl.maximum(0, first_position + query_tile * BLOCK_Q - sliding_window + 1)
        key_start = (key_start // TILE_N) * TILE_N
    page_row_ptr = page_table_ptr + seq.to(tl.int64) * stride_page_table

    m = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    for tile_start in range(key_start, key_end, TILE_N):
        keys = tile_start + tl.arange(0, TILE_N)
        key_mask = keys < key_end
        k, v = load_kv_tile(
            pool_ptr,
            page_row_ptr,
            keys,
            key_mask,
            kv_head,
            dims,
            dim_mask,
            stride_pool_page,
            stride_pool_kv,
            stride_pool_token,
            stride_pool_head,
            BLOCK_SIZE,
        )
        allowed = key_mask[None, :] & (keys[None, :] <= query_positions[:, None])
        if HAS_WINDOW:
            allowed = allowed & (keys[None, :] > query_positions[:, None] - sliding_window)
        m, row_sum, acc = online_softmax_step(
            q, k, v, allowed, m, row_sum, acc, qk_scale, DOT_PRECISION, UPCAST
        )

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(
        out_ptr + tokens[:, None] * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


def varlen_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    sliding_window: int | None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    rows_per_program: int = 64,
    tile_n: int = 32,
) -> torch.Tensor:
    """``q [T, heads, head_dim]`` -> ``[T, heads, head_dim]``, each sequence's new tokens attending
    causally over its pages (``page_table [n, max_blocks]`` page indices of this layer).

    ``rows_per_program``: query rows (queries x grouped heads) per program, a power of two.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, pool_head_dim = pool.shape
    if pool_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit pool {tuple(pool.shape)}.")
    if q.stride(2) != 1 or not pool.is_contiguous() or page_table.stride(1) != 1:
        raise ValueError("varlen_attention needs unit-stride head dims, a contiguous pool and page table rows.")
    group_size = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group_size)
    block_q = max(1, rows_per_program // block_g)
    if out is None:
        out = torch.empty_like(q)
    num_seqs = len(context_lens)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _varlen_attention_kernel[grid](
        q,
        out,
        pool,
        page_table,
        query_start_loc,
        context_lens,
        (scale if scale is not None else head_dim**-0.5) * LOG2_E,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        pool.stride(0),
        pool.stride(1),
        pool.stride(2),
        pool.stride(3),
        GROUP_SIZE=group_size,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_G=block_g,
        BLOCK_D=block_d(head_dim),
        TILE_N=tile_n,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        UPCAST=dot_upcast(q.dtype),
    )
    return out
