"""Triton paged attention: the ``PagedAttention`` backend for accelerators (DESIGN.md "Executor on
accelerators").

Three kernels read and write the page pool in place through the step's per-layer page tables
(``AttentionMetadata``), so device blocks and staging slots of host blocks are alike to them and
no sequence's KV is ever gathered: ``write_kv`` (new K/V into their slots), ``decode_attention``
(one new token per sequence, split-K with a reduce kernel) and ``varlen_attention`` (any mix of
prefill, chunked prefill and decode).

Importing this package imports triton. On a machine without CUDA the kernels run in Triton's
interpreter, which must be switched on (``TRITON_INTERPRET=1``) before triton is first imported.
"""

from __future__ import annotations

import torch

from workers.executor.attention import AttentionMetadata
from workers.executor.triton_attention.decode import choose_num_splits, decode_attention
from workers.executor.triton_attention.varlen import varlen_attention
from workers.executor.triton_attention.write_kv import write_kv

__all__ = ["TritonPagedAttention", "decode_attention", "varlen_attention", "write_kv"]


class TritonPagedAttention:
    """Decode steps (every sequence one new token) go to the split-K decode kernel; any other
    step, mixed ones included, to the varlen kernel. ``num_splits`` fixes the decode split count
    (default: ``choose_num_splits`` per step); ``tile_n`` the keys per tile (default: 64, 32 for
    head dims over 128, whose tiles would not fit a GPU's registers and shared memory)."""

    def __init__(self, num_splits: int | None = None, tile_n: int | None = None) -> None:
        self.num_splits = num_splits
        self.tile_n = tile_n

    def write_kv(
        self,
        pool: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_pages: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        write_kv(pool, k, v, slot_pages, meta.slot_offsets)

    def attend(
        self,
        q: torch.Tensor,
        pool: torch.Tensor,
        page_table: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None,
        scale: float | None = None,
    ) -> torch.Tensor:
        tile_n = self.tile_n or (64 if q.shape[2] <= 128 else 32)
        if meta.max_query_len == 1:
            num_splits = self.num_splits or choose_num_splits(
                meta.num_seqs, pool.shape[3], meta.max_context_len, q.device
            )
            return decode_attention(
                q, pool, page_table, meta.context_lens, sliding_window, num_splits, scale=scale, tile_n=tile_n
            )
        return varlen_attention(
            q,
            pool,
            page_table,
            meta.query_start_loc,
            meta.context_lens,
            meta.max_query_len,
            sliding_window,
            scale=scale,
            tile_n=tile_n,
        )
