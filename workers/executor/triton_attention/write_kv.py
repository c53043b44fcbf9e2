"""The K/V write: each new token's K and V go into its slot (page, in-page offset) of the pool.

One program per tile of ``BLOCK_T`` tokens; a token's ``kv_heads * head_dim`` values are one row
of the tile, so any number of heads and any head dim works (masked up to a power of two). Pages
come from the step's per-layer slot pages, so device blocks and staging slots are written alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    pool_ptr,
    slot_pages_ptr,
    slot_offsets_ptr,
    num_tokens,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_pool_page,
    stride_pool_kv,
    stride_pool_token,
    stride_pool_head,
    HEAD_DIM: tl.constexpr,
    NUM_VALUES: tl.constexpr,  # kv_heads * head_dim
    BLOCK_T: tl.constexpr,
    BLOCK_VALUES: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    values = tl.arange(0, BLOCK_VALUES)
    heads = values // HEAD_DIM
    dims = values % HEAD_DIM
    token_mask = tokens < num_tokens
    mask = token_mask[:, None] & (values < NUM_VALUES)[None, :]
    # int64 throughout: page * page stride overflows int32 on a large pool.
    pages = tl.load(slot_pages_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    offsets = tl.load(slot_offsets_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    tokens64 = tokens.to(tl.int64)
    k = tl.load(
        k_ptr + tokens64[:, None] * stride_k_token + heads[None, :] * stride_k_head + dims[None, :], mask=mask
    )
    v = tl.load(
        v_ptr + tokens64[:, None] * stride_v_token + heads[None, :] * stride_v_head + dims[None, :], mask=mask
    )
    destination = (
        pool_ptr
        + pages[:, None] * stride_pool_page
        + offsets[:, None] * stride_pool_token
        + heads[None, :] * stride_pool_head
        + dims[None, :]
    )
    tl.store(destination, k.to(pool_ptr.dtype.element_ty), mask=mask)
    tl.store(destination + stride_pool_kv, v.to(pool_ptr.dtype.element_ty), mask=mask)


def write_kv(
    pool: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_pages: torch.Tensor,
    slot_offsets: torch.Tensor,
    block_t: int = 16,
) -> None:
    """``pool[slot_pages[t], 0, slot_offsets[t]] = k[t]`` (and V at index 1) for every token ``t``.

    ``k``/``v``: ``[T, kv_heads, head_dim]`` with a unit stride over head_dim (views of a fused
    projection are fine); ``pool``: ``[pages, 2, block_size, kv_heads, head_dim]``, contiguous.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or pool.shape[3:] != (num_kv_heads, head_dim):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and pool {tuple(pool.shape)} disagree.")
    if k.stride(2) != 1 or v.stride(2) != 1 or not pool.is_contiguous():
        raise ValueError("write_kv needs unit-stride head dims and a contiguous pool.")
    if num_tokens == 0:
        return
    num_values = num_kv_heads * head_dim
    _write_kv_kernel[(triton.cdiv(num_tokens, block_t),)](
        k,
        v,
        pool,
        slot_pages,
        slot_offsets,
        num_tokens,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        pool.stride(0),
        pool.stride(1),
        pool.stride(2),
        pool.stride(3),
        HEAD_DIM=head_dim,
        NUM_VALUES=num_values,
        BLOCK_T=block_t,
        BLOCK_VALUES=triton.next_power_of_2(num_values),
    )
