"""Paged attention metadata and the torch backend against a naive per-sequence reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.executor.attention import AttentionMetadata, StepLayout, TorchPagedAttention, arrays_to_device
from workers.executor.kv_pool import StagingRing

CPU = torch.device("cpu")


def build(
    query_lens, starts, block_tables, block_size=4, num_device_blocks=16, staging=None
) -> AttentionMetadata:
    layout = StepLayout.build(
        np.array(query_lens),
        np.array(starts),
        np.array([len(table) for table in block_tables]),
        np.array([b for table in block_tables for b in table]),
        block_size,
        num_device_blocks,
        staging,
    )
    meta, _ = AttentionMetadata.from_layout(layout, CPU)
    return meta


def test_metadata_layout():
    # Sequence 0: prefill of 3 tokens; sequence 1: one decode token at position 5; sequence 2: a
    # chunk of 2 tokens at positions 4-5.
    meta = build([3, 1, 2], [0, 5, 4], [[7], [2, 9], [3, 5]])
    assert meta.num_seqs == 3 and meta.num_tokens == 6 and meta.max_query_len == 3
    assert meta.max_context_len == 6
    assert meta.positions.tolist() == [0, 1, 2, 5, 4, 5]
    assert meta.query_start_loc.tolist() == [0, 3, 4, 6]
    assert meta.context_lens.tolist() == [3, 6, 6]
    assert meta.block_tables.tolist() == [[7, 0], [2, 9], [3, 5]]
    assert meta.slot_blocks.tolist() == [7, 7, 7, 9, 5, 5]
    assert meta.slot_offsets.tolist() == [0, 1, 2, 1, 0, 1]
    # Layer l's pages are block ids + l * D.
    assert meta.page_table(2).tolist() == [[39, 32], [34, 41], [35, 37]]
    assert meta.slot_pages(1).tolist() == [23, 23, 23, 25, 21, 21]


def test_decodes_and_the_rest_are_separate_groups():
    meta = build([3, 1, 2], [0, 5, 4], [[7], [2, 9], [3, 5]])
    decode, rest = meta.groups
    assert decode.seq_ids.tolist() == [1] and decode.token_rows.tolist() == [3]
    assert (decode.num_seqs, decode.num_tokens, decode.max_query_len, decode.num_blocks) == (1, 1, 1, 2)
    assert decode.uniform_query_len and decode.padded_query_positions.tolist() == [[5]]
    assert rest.seq_ids.tolist() == [0, 2] and rest.token_rows.tolist() == [0, 1, 2, 4, 5]
    assert rest.token_seq_ids.tolist() == [0, 0, 0, 1, 1] and rest.token_query_ids.tolist() == [0, 1, 2, 0, 1]
    assert rest.padded_query_positions.tolist() == [[0, 1, 2], [4, 5, 0]]
    assert not rest.uniform_query_len


def test_one_group_when_all_alike():
    (group,) = build([1, 1], [0, 6], [[4], [1, 2]]).groups
    assert group.seq_ids is None and group.token_rows is None and group.uniform_query_len
    assert group.num_blocks == 2  # covers the longest context, not every table column
    (group,) = build([3, 2], [0, 0], [[4], [1, 2]]).groups
    assert group.seq_ids is None and group.num_blocks == 1


def test_attention_mask_is_causal_with_optional_window():
    meta = build([3, 2], [0, 4], [[7], [2, 9]])
    (group,) = meta.groups
    mask = group.attention_mask(None, 4)
    assert mask.shape == (2, 1, 3, 8)
    assert mask[0, 0, 2].tolist() == [True] * 3 + [False] * 5
    assert mask[1, 0, 0].tolist() == [True] * 5 + [False] * 3
    assert mask[1, 0, 2].tolist() == [True] + [False] * 7  # padding query row: key 0 only, never empty
    windowed = group.attention_mask(2, 4)
    assert windowed[1, 0, 1].tolist() == [False] * 4 + [True] * 2 + [False] * 2
    assert group.attention_mask(2, 4) is windowed  # built once per step


@pytest.mark.parametrize(
    "query_lens, starts, message",
    [
        ([2], [0], "do not cover"),
        ([0], [0], "at least one new token"),
        ([1], [99], "do not cover"),
    ],
)
def test_metadata_rejects_inconsistent_plans(query_lens, starts, message):
    with pytest.raises(ValueError, match=message):
        build(query_lens, starts, [[0]], block_size=1)


def test_metadata_rejects_non_device_blocks():
    with pytest.raises(ValueError, match="device blocks"):
        build([1], [0], [[16]])


def test_host_blocks_map_to_staging_pages():
    # D = 16 device blocks, 4 layers: device pages 0..63, then R = 2 areas of M = 3 staging pages.
    # Sequence 0: prefill of 6 tokens over host block 20 then device block 7; sequence 1: a decode
    # at position 5 over host blocks 18 and 21.
    staging = StagingRing(first_page=64, num_areas=2, area_size=3)
    meta = build([6, 1], [0, 5], [[20, 7], [18, 21]], staging=staging)
    assert meta.host_block_ids.tolist() == [18, 20, 21]  # staging slots 0, 1, 2
    assert meta.written_host_block_ids.tolist() == [20, 21]
    assert meta.block_tables.tolist() == [[20, 7], [18, 21]]  # ids stay ids
    assert meta.page_table(0).tolist() == [[65, 7], [64, 66]]
    assert meta.page_table(3).tolist() == [[68, 3 * 16 + 7], [67, 69]]  # area 1, device page 55
    assert meta.slot_pages(0).tolist() == [65, 65, 65, 65, 7, 7, 66]
    assert meta.slot_pages(3).tolist() == [68, 68, 68, 68, 55, 55, 69]
    # Without host blocks the staging ring changes nothing.
    device_only = build([1], [0], [[7]], staging=staging)
    assert device_only.ring_block_tables is None and device_only.host_block_ids.size == 0
    assert device_only.page_table(3).tolist() == [[55]]


def test_metadata_rejects_more_host_blocks_than_a_staging_area_holds():
    staging = StagingRing(first_page=64, num_areas=2, area_size=2)
    build([1], [8], [[16, 17, 2]], staging=staging)
    with pytest.raises(ValueError, match="3 distinct host blocks but a staging area holds 2"):
        build([1], [8], [[16, 17, 18]], staging=staging)


def test_backend_reads_staged_pages_like_device_pages():
    """The same K/V, once in device pages and once in staging pages, gives the same attention."""
    torch.manual_seed(2)
    num_blocks, block_size = 8, 4
    pool = torch.zeros(num_blocks + 4, 2, block_size, 2, 8)
    pool[[1, 5]] = torch.randn(2, 2, block_size, 2, 8)
    pool[[8, 9]] = pool[[1, 5]]  # staging slots 0, 1 of a one-area ring at page 8
    q = torch.randn(1, 4, 8)
    backend = TorchPagedAttention()
    device = build([1], [6], [[1, 5]], num_device_blocks=num_blocks)
    staged = build([1], [6], [[8, 12]], num_device_blocks=num_blocks, staging=StagingRing(8, 1, 4))
    for meta in (device, staged):  # the new token's K/V goes to block 5 / host block 12 (slot 1)
        backend.write_kv(pool, torch.ones(1, 2, 8), torch.ones(1, 2, 8), meta.slot_pages(0), meta)
    expected = backend.attend(q, pool, device.page_table(0), device, None)
    assert torch.equal(backend.attend(q, pool, staged.page_table(0), staged, None), expected)


def test_arrays_to_device_keeps_shapes():
    tensors = arrays_to_device(
        dict(first=np.arange(6).reshape(2, 3), second=np.array([7], dtype=np.int32)), CPU
    )
    first, second = tensors["first"], tensors["second"]
    assert first.tolist() == [[0, 1, 2], [3, 4, 5]] and second.tolist() == [7]
    assert first.dtype == torch.int64


def reference_attention(q, k, v, positions, window):
    """Plain softmax attention of one sequence: q [Q, H, d] at ``positions``, k/v [C, Hkv, d]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    key_positions = torch.arange(k.shape[0])
    allowed = key_positions[None, :] <= positions[:, None]
    if window is not None:
        allowed &= key_positions[None, :] > positions[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_torch_backend_matches_reference(window, num_kv_heads):
    torch.manual_seed(0)
    block_size, num_blocks, num_layers, num_heads, head_dim = 4, 20, 2, 4, 8
    backend = TorchPagedAttention()
    pool = torch.zeros(num_layers * num_blocks, 2, block_size, num_kv_heads, head_dim)
    # Per sequence: tokens already cached, tokens in this step (prefill, chunk, decode, decode).
    layout = [(0, 6), (5, 4), (9, 1), (2, 1)]
    tables = [[13, 2], [7, 0, 19], [4, 11, 8], [16]]
    full = [
        (torch.randn(c + n, num_kv_heads, head_dim), torch.randn(c + n, num_kv_heads, head_dim))
        for c, n in layout
    ]
    layer = 1
    for (cached, _), table, (k, v) in zip(layout, tables, full):  # what earlier steps would have written
        for position in range(cached):
            page = layer * num_blocks + table[position // block_size]
            pool[page, 0, position % block_size] = k[position]
            pool[page, 1, position % block_size] = v[position]
    step = StepLayout.build(
        np.array([n for _, n in layout]),
        np.array([c for c, _ in layout]),
        np.array([len(t) for t in tables]),
        np.array([b for t in tables for b in t]),
        block_size,
        num_blocks,
    )
    meta, _ = AttentionMetadata.from_layout(step, CPU)
    new_k = torch.cat([k[c:] for (c, _), (k, _) in zip(layout, full)])
    new_v = torch.cat([v[c:] for (c, _), (_, v) in zip(layout, full)])
    q = torch.randn(meta.num_tokens, num_heads, head_dim)
    backend.write_kv(pool, new_k, new_v, meta.slot_pages(layer), meta)
    out = backend.attend(q, pool, meta.page_table(layer), meta, window)
    assert pool[:num_blocks].abs().sum() == 0  # layer 0's pages untouched
    expected = torch.cat(
        [
            reference_attention(q_seq, k, v, torch.arange(c, c + n), window)
            for (c, n), (k, v), q_seq in zip(layout, full, q.split([n for _, n in layout]))
        ]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_torch_backend_uniform_decode_batch():
    """All-decode steps take the no-padding path."""
    torch.manual_seed(1)
    block_size, num_blocks = 2, 8
    pool = torch.randn(num_blocks, 2, block_size, 2, 4)
    meta = build(
        [1, 1, 1], [3, 0, 1], [[5, 1], [2], [7]], block_size=block_size, num_device_blocks=num_blocks
    )
    assert len(meta.groups) == 1 and meta.groups[0].uniform_query_len
    q = torch.randn(3, 4, 4)
    out = TorchPagedAttention().attend(q, pool, meta.page_table(0), meta, None)
    for i, (position, table) in enumerate([(3, [5, 1]), (0, [2]), (1, [7])]):
        k = pool[table, 0].flatten(0, 1)[: position + 1]
        v = pool[table, 1].flatten(0, 1)[: position + 1]
        expected = reference_attention(q[i : i + 1], k, v, torch.tensor([position]), None)
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-5, rtol=1e-5)
