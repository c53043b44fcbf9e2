"""Decode attention over paged KV with split-K (flash-decoding).

Every sequence has one new token (at position ``context_len - 1``, its K/V already in the pool).
Grid: ``(sequence, kv head, split)``. Each sequence's visible keys (all of them, or the last
``sliding_window``) are cut into ``num_splits`` equal ranges; a program attends the query heads
that share its kv head over one range and stores its normalised partial output and log-sum-exp.
A second kernel, one program per (sequence, head), combines the splits. With one split the first
kernel writes the output directly and the second is not launched.

Splitting keeps a long-context, small-batch decode from running on a handful of programs; the
heuristic (``choose_num_splits``) splits only when sequences times kv heads leave the device idle.
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

MAX_SPLITS = 16
MIN_KEYS_PER_SPLIT = 256


@triton.jit
def _decode_split_kernel(
    q_ptr,
    out_ptr,  # [n, heads, head_dim] with one split, else the partials [n, heads, splits, head_dim]
    lse_ptr,  # [n, heads, splits] log2-sum-exp of each split (unused with one split)
    pool_ptr,
    page_table_ptr,
    context_lens_ptr,
    qk_scale,
    sliding_window,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_out_split,
    stride_lse_token,
    stride_lse_head,
    stride_page_table,
    stride_pool_page,
    stride_pool_kv,
    stride_pool_token,
    stride_pool_head,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    first_key = 0
    if HAS_WINDOW:
        first_key = tl.maximum(0, context_len - sliding_window)
    keys_per_split = tl.cdiv(tl.cdiv(context_len - first_key, NUM_SPLITS), TILE_N) * TILE_N
    split_start = first_key + split * keys_per_split
    split_end = tl.minimum(split_start + keys_per_split, context_len)

    group_ids = tl.arange(0, BLOCK_G)
    row_mask = group_ids < GROUP_SIZE
    heads = kv_head * GROUP_SIZE + group_ids
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    seq64 = seq.to(tl.int64)
    q = tl.load(
        q_ptr + seq64 * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    page_row_ptr = page_table_ptr + seq64 * stride_page_table

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile_start in range(split_start, split_end, TILE_N):
        keys = tile_start + tl.arange(0, TILE_N)
        key_mask = keys < split_end
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
        # Every key before the query is visible; the window is already applied by first_key.
        allowed = row_mask[:, None] & key_mask[None, :]
        m, row_sum, acc = online_softmax_step(
            q, k, v, allowed, m, row_sum, acc, qk_scale, DOT_PRECISION, UPCAST
        )

    has_keys = row_sum > 0.0
    out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
    out_pointers = (
        out_ptr
        + seq64 * stride_out_token
        + heads[:, None] * stride_out_head
        + split * stride_out_split
        + dims[None, :]
    )
    tl.store(out_pointers, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    if NUM_SPLITS > 1:
        # An empty split (a short sequence in a batch split for a long one) weighs nothing.
        lse = tl.where(has_keys, m + tl.math.log2(tl.where(has_keys, row_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq64 * stride_lse_token + heads * stride_lse_head + split, lse, mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    partial_ptr,  # [n, heads, splits, head_dim] float32
    lse_ptr,  # [n, heads, splits] float32
    out_ptr,
    stride_partial_token,
    stride_partial_head,
    stride_partial_split,
    stride_lse_token,
    stride_lse_head,
    stride_out_token,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    lse = tl.load(
        lse_ptr + seq * stride_lse_token + head * stride_lse_head + splits, mask=split_mask, other=float("-inf")
    )
    # Split 0 always holds keys (a context has at least one), so the max is finite.
    weights = tl.math.exp2(lse - tl.max(lse, 0))
    partial = tl.load(
        partial_ptr
        + seq * stride_partial_token
        + head * stride_partial_head
        + splits[:, None] * stride_partial_split
        + dims[None, :],
        mask=split_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    out = tl.sum(weights[:, None] * partial, 0) / tl.sum(weights, 0)
    tl.store(
        out_ptr + seq * stride_out_token + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_mask,
    )


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Enough splits to give every multiprocessor about two programs, never a split under
    ``MIN_KEYS_PER_SPLIT`` keys, at most ``MAX_SPLITS`` (one on CPU: the interpreter runs
    programs one by one, so splitting only adds work there)."""
    if device.type != "cuda":
        return 1
    num_programs = num_seqs * num_kv_heads
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(target, num_programs)
    return max(1, min(MAX_SPLITS, wanted, triton.cdiv(max_context_len, MIN_KEYS_PER_SPLIT)))


def decode_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    sliding_window: int | None,
    num_splits: int = 1,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    tile_n: int = 32,
) -> torch.Tensor:
    """``q [n, heads, head_dim]`` (one token per sequence) -> ``[n, heads, head_dim]``."""
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, pool_head_dim = pool.shape
    if pool_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit pool {tuple(pool.shape)}.")
    if q.stride(2) != 1 or not pool.is_contiguous() or page_table.stride(1) != 1:
        raise ValueError("decode_attention needs unit-stride head dims, a contiguous pool and page table rows.")
    if len(context_lens) != num_seqs or not 1 <= num_splits <= 256:
        raise ValueError(f"{num_seqs} queries need as many context lengths, and 1..256 splits.")
    if out is None:
        out = torch.empty_like(q)
    group_size = num_heads // num_kv_heads
    padded_dim = block_d(head_dim)
    if num_splits == 1:
        partial, lse = out, out  # written directly; lse unused
        stride_split = stride_lse_token = stride_lse_head = 0
    else:
        partial = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        stride_split, stride_lse_token, stride_lse_head = partial.stride(2), lse.stride(0), lse.stride(1)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        partial,
        lse,
        pool,
        page_table,
        context_lens,
        (scale if scale is not None else head_dim**-0.5) * LOG2_E,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        partial.stride(0),
        partial.stride(1),
        stride_split,
        stride_lse_token,
        stride_lse_head,
        page_table.stride(0),
        pool.stride(0),
        pool.stride(1),
        pool.stride(2),
        pool.stride(3),
        GROUP_SIZE=group_size,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        # At least 16 rows: the smallest tl.dot a GPU runs. Padding rows are masked.
        BLOCK_G=max(16, triton.next_power_of_2(group_size)),
        BLOCK_D=padded_dim,
        TILE_N=tile_n,
        NUM_SPLITS=num_splits,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        UPCAST=dot_upcast(q.dtype),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            partial,
            lse,
            out,
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=padded_dim,
        )
    return out

