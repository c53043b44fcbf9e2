"""Paged attention: per-step metadata, the ``PagedAttention`` protocol, and its plain-torch backend
(the CPU path and the reference); ``make_attention_backend`` picks it or the Triton kernels
(``triton_attention``, which read the same pages through the same page tables).

A step's tokens arrive flattened (``[T]``, grouped by sequence, in plan order); each sequence has
``query_len`` new tokens starting at ``start_position``, with everything before them already in
the KV pool. Prefill (start 0), chunked prefill (start > 0, several tokens) and decode (one token)
are the same case, so one batch mixes them freely. Each layer first writes the new K/V into their
pages, then attends over the sequence's pages (cache and new tokens alike).

A step is laid out once on the host (``StepLayout.build``, which checks the plan's arrays) and copied
to the device as ``AttentionMetadata.from_layout(layout, device)``; the CUDA-graph runner pads the
same layout into its persistent buffers instead. ``AttentionMetadata`` is shared by every layer; it
is the only place that maps a block id to a page of a given layer: ``layer * D + block`` for a
device block, and for a host block (id >= D) its staging slot in the layer's area of the staging
ring (DESIGN.md "Streaming"), so the backend never knows which tier a page came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from proto.config import ConfigError
from workers.executor.kv_pool import StagingRing


def arrays_to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Move several small integer arrays in one host-to-device copy (as int64 views of one buffer)."""
    sizes = [array.size for array in arrays.values()]
    packed = np.concatenate([array.reshape(-1) for array in arrays.values()]).astype(np.int64, copy=False)
    flat = torch.from_numpy(packed)
    if device.type == "cuda":
        # NOTE: pinned, so the copy is truly asynchronous; the caching host allocator keeps the buffer
        # alive until the copy is done.
        flat = flat.pin_memory()
    parts = flat.to(device, non_blocking=True).split(sizes)
    return {name: part.view(array.shape) for (name, array), part in zip(arrays.items(), parts)}


@dataclass
class AttentionGroup:
    """Sequences attended in one call, each padded to the group's longest query and context.

    A step has at most two groups: decodes (one new token each) and the rest. Padding every
    decode row to a long prefill's length would multiply their attention work by that length.
    Tensors index the step: ``seq_ids`` are rows of its block tables, ``token_rows`` rows of its
    ``[T]`` tokens; both are None when the group is the whole step, in order.
    """

    num_seqs: int
    num_tokens: int
    max_query_len: int
    num_blocks: int  # block-table columns that cover the group's longest context
    seq_ids: torch.Tensor | None
    token_rows: torch.Tensor | None
    token_seq_ids: torch.Tensor  # [T_g] each token's sequence, within the group
    token_query_ids: torch.Tensor  # [T_g] each token's index among its sequence's new tokens
    padded_query_positions: torch.Tensor  # [n_g, max_query_len] positions per sequence, 0 in padding
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def uniform_query_len(self) -> bool:
        """All sequences have the same number of new tokens (e.g. all decode): no padding needed."""
        return self.num_tokens == self.num_seqs * self.max_query_len

    def attention_mask(self, sliding_window: int | None, block_size: int) -> torch.Tensor:
        """``[n_g, 1, max_query_len, num_blocks * block_size]`` True where a query may attend a key.

        Causal on positions (which also hides keys past the context and in padding blocks), plus
        ``key > query - sliding_window`` when a window is set, as transformers does. Padding query
        rows see key 0 only, so they never softmax over nothing. Built once per step and window.
        """
        mask = self._masks.get(sliding_window)
        if mask is None:
            key_positions = torch.arange(
                self.num_blocks * block_size, device=self.padded_query_positions.device
            )
            query_positions = self.padded_query_positions[:, :, None]
            mask = key_positions <= query_positions
            if sliding_window is not None:
                mask &= key_positions > query_positions - sliding_window
            mask = mask[:, None]
            self._masks[sliding_window] = mask
        return mask


class LayerHooks(Protocol):
    """Called by every layer around its attention when a step streams host blocks (see streaming.py)."""

    def before_attention(self, layer: int) -> None:
        """Return once ``layer``'s staging area holds the step's host blocks (before K/V is written)."""
        ...

    def after_attention(self, layer: int) -> None:
        """``layer`` is done with its staging area: write back, then reuse it."""
        ...


def _no_block_ids() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass
class AttentionMetadata:
    """The batch layout of one step. Tensors are int64 on the compute device.

    - ``positions [T]``: position of each token.
    - ``query_start_loc [n + 1]``: where each sequence's tokens start in ``[T]``.
    - ``context_lens [n]``: tokens each sequence attends to (cached + new).
    - ``block_tables [n, max_blocks]``: block ids, padded with block 0 (never attended to).
    - ``slot_blocks [T]`` / ``slot_offsets [T]``: the block and in-block offset each new token's K/V goes to.
    - ``groups``: how the sequences are batched into attention calls (see ``AttentionGroup``).

    With host blocks (ids >= D, only when built with a ``staging`` ring):

    - ``host_block_ids``: the step's distinct host block ids, sorted; the i-th has staging slot i.
    - ``written_host_block_ids``: those that new tokens are written into (sorted).
    - ``ring_block_tables [R, n, max_blocks]`` / ``block_strides [n, max_blocks]``: layer ``l``'s page
      table is ``ring_block_tables[l % R] + l * block_strides`` (stride D for device blocks, 0 for
      staging pages); ``ring_slot_blocks [R, T]`` / ``slot_strides [T]`` likewise for slot pages.
    - ``stream``: the hooks each layer calls around its attention (None: no host blocks, no calls).
    """

    num_seqs: int
    num_tokens: int
    max_query_len: int
    max_context_len: int
    block_size: int
    num_device_blocks: int
    positions: torch.Tensor
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    groups: list[AttentionGroup]
    host_block_ids: np.ndarray = field(default_factory=_no_block_ids)
    written_host_block_ids: np.ndarray = field(default_factory=_no_block_ids)
    ring_block_tables: torch.Tensor | None = None
    block_strides: torch.Tensor | None = None
    ring_slot_blocks: torch.Tensor | None = None
    slot_strides: torch.Tensor | None = None
    stream: LayerHooks | None = None

    @classmethod
    def from_layout(
        cls, layout: StepLayout, device: torch.device, extra: dict[str, np.ndarray] | None = None
    ) -> tuple[AttentionMetadata, dict[str, torch.Tensor]]:
        """The layout's tensors on ``device`` in one host-to-device copy, together with ``extra``
        arrays of the step (the runner's token ids and sampled rows), returned as tensors."""
        extra = extra or {}
        host = layout.arrays() | {f"extra.{name}": array for name, array in extra.items()}
        tensors = arrays_to_device(host, device)
        groups = []
        for i, members in enumerate(layout.group_members):
            member_lens = layout.query_lens[members]
            groups.append(
                AttentionGroup(
                    num_seqs=len(members),
                    num_tokens=int(member_lens.sum()),
                    max_query_len=int(member_lens.max()),
                    num_blocks=-(-int(layout.context_lens[members].max()) // layout.block_size),
                    seq_ids=tensors[f"group{i}.seq_ids"] if layout.split else None,
                    token_rows=tensors[f"group{i}.token_rows"] if layout.split else None,
                    token_seq_ids=tensors[f"group{i}.token_seq_ids"],
                    token_query_ids=tensors[f"group{i}.token_query_ids"],
                    padded_query_positions=tensors[f"group{i}.padded_query_positions"],
                )
            )
        meta = cls(
            num_seqs=layout.num_seqs,
            num_tokens=layout.num_tokens,
            max_query_len=int(layout.query_lens.max()),
            max_context_len=int(layout.context_lens.max()),
            block_size=layout.block_size,
            num_device_blocks=layout.num_device_blocks,
            groups=groups,
            host_block_ids=layout.host_block_ids,
            written_host_block_ids=layout.written_host_block_ids,
            **{name: tensors[name] for name in host if "." not in name},
            **{name.removeprefix("stream."): tensors[name] for name in host if name.startswith("stream.")},
        )
        return meta, {
            name.removeprefix("extra."): tensors[name] for name in host if name.startswith("extra.")
        }

    def page_table(self, layer: int) -> torch.Tensor:
        """``[n, max_blocks]`` page indices of each sequence's blocks in ``layer``."""
        if self.ring_block_tables is None:
            return self.block_tables + layer * self.num_device_blocks
        ring = self.ring_block_tables[layer % self.ring_block_tables.shape[0]]
        return torch.add(ring, self.block_strides, alpha=layer)

    def slot_pages(self, layer: int) -> torch.Tensor:
        """``[T]`` the page each new token's K/V is written to in ``layer``."""
        if self.ring_slot_blocks is None:
            return self.slot_blocks + layer * self.num_device_blocks
        ring = self.ring_slot_blocks[layer % self.ring_slot_blocks.shape[0]]
        return torch.add(ring, self.slot_strides, alpha=layer)


@dataclass
class StepLayout:
    """A step's batch layout as host arrays: what ``AttentionMetadata`` holds on the device, before
    it is copied there (the CUDA-graph runner pads these into its persistent buffers instead)."""

    query_lens: np.ndarray
    block_size: int
    num_device_blocks: int
    positions: np.ndarray
    query_start_loc: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    slot_blocks: np.ndarray
    slot_offsets: np.ndarray
    group_members: list[np.ndarray]
    start_positions: np.ndarray
    host_block_ids: np.ndarray = field(default_factory=_no_block_ids)
    written_host_block_ids: np.ndarray = field(default_factory=_no_block_ids)
    stream: dict[str, np.ndarray] = field(default_factory=dict)  # the ring tables (host blocks only)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    @property
    def split(self) -> bool:
        """Decodes and the rest are attended as two groups."""
        return len(self.group_members) > 1

    @property
    def is_decode(self) -> bool:
        return bool((self.query_lens == 1).all())

    @classmethod
    def build(
        cls,
        query_lens: np.ndarray,
        start_positions: np.ndarray,
        num_blocks: np.ndarray,
        block_ids: np.ndarray,
        block_size: int,
        num_device_blocks: int,
        staging: StagingRing | None = None,
    ) -> StepLayout:
        """Block ids >= ``num_device_blocks`` are host blocks, allowed only with a ``staging`` ring.
        Raises ``ValueError`` when the arrays disagree, a block id is not a device block (without
        staging), or the step uses more distinct host blocks than a staging area holds.
        """
        query_lens = np.asarray(query_lens, dtype=np.int64)
        start_positions = np.asarray(start_positions, dtype=np.int64)
        num_blocks = np.asarray(num_blocks, dtype=np.int64)
        block_ids = np.asarray(block_ids, dtype=np.int64)
        num_seqs = len(query_lens)
        if num_seqs == 0 or len(start_positions) != num_seqs or len(num_blocks) != num_seqs:
            raise ValueError(
                "a step needs at least one sequence, and one query length, start and block count each."
            )
        if query_lens.min() < 1 or start_positions.min() < 0:
            raise ValueError("every sequence needs at least one new token and a non-negative start position.")
        if num_blocks.sum() != len(block_ids):
            raise ValueError(
                f"block tables hold {len(block_ids)} ids but num_blocks sums to {num_blocks.sum()}."
            )
        if len(block_ids) and block_ids.min() < 0:
            raise ValueError("block ids must be non-negative.")
        has_host_blocks = len(block_ids) > 0 and block_ids.max() >= num_device_blocks
        if has_host_blocks and staging is None:
            raise ValueError(f"block ids must be device blocks in [0, {num_device_blocks}).")
        context_lens = start_positions + query_lens
        if np.any(num_blocks * block_size < context_lens):
            raise ValueError("a sequence's blocks do not cover all of its positions.")

        seq_ids = np.arange(num_seqs)
        query_start_loc = np.concatenate([[0], np.cumsum(query_lens)])
        num_tokens = int(query_start_loc[-1])
        token_seq_ids = np.repeat(seq_ids, query_lens)
        positions = start_positions[token_seq_ids] + np.arange(num_tokens) - query_start_loc[token_seq_ids]

        block_tables = np.zeros((num_seqs, int(num_blocks.max())), dtype=np.int64)
        block_starts = np.concatenate([[0], np.cumsum(num_blocks)])[:-1]
        block_columns = np.arange(len(block_ids)) - np.repeat(block_starts, num_blocks)
        block_tables[np.repeat(seq_ids, num_blocks), block_columns] = block_ids
        slot_blocks = block_tables[token_seq_ids, positions // block_size]

        # Decodes and the rest are attended separately (see AttentionGroup); one group if all alike.
        is_decode = query_lens == 1
        split = is_decode.any() and not is_decode.all()
        layout = cls(
            query_lens=query_lens,
            block_size=block_size,
            num_device_blocks=num_device_blocks,
            positions=positions,
            query_start_loc=query_start_loc,
            context_lens=context_lens,
            block_tables=block_tables,
            slot_blocks=slot_blocks,
            slot_offsets=positions % block_size,
            group_members=[seq_ids[is_decode], seq_ids[~is_decode]] if split else [seq_ids],
            start_positions=start_positions,
        )
        if has_host_blocks:
            assert staging is not None
            layout.host_block_ids = np.unique(block_ids[block_ids >= num_device_blocks])
            if len(layout.host_block_ids) > staging.area_size:
                raise ValueError(
                    f"the step uses {len(layout.host_block_ids)} distinct host blocks but a staging area "
                    f"holds {staging.area_size}."
                )
            layout.written_host_block_ids = np.unique(slot_blocks[slot_blocks >= num_device_blocks])
            ring_block_tables, block_strides = _ring_tables(
                block_tables, layout.host_block_ids, num_device_blocks, staging
            )
            ring_slot_blocks, slot_strides = _ring_tables(
                slot_blocks, layout.host_block_ids, num_device_blocks, staging
            )
            layout.stream = dict(
                ring_block_tables=ring_block_tables,
                block_strides=block_strides,
                ring_slot_blocks=ring_slot_blocks,
                slot_strides=slot_strides,
            )
        return layout

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array ``AttentionMetadata.from_layout`` copies to the device, by tensor name."""
        host = dict(
            positions=self.positions,
            query_start_loc=self.query_start_loc,
            context_lens=self.context_lens,
            block_tables=self.block_tables,
            slot_blocks=self.slot_blocks,
            slot_offsets=self.slot_offsets,
        )
        for i, members in enumerate(self.group_members):
            group = _group_layout(members, self.query_lens, self.start_positions, self.query_start_loc)
            host |= {f"group{i}.{name}": array for name, array in group.items()}
        return host | {f"stream.{name}": array for name, array in self.stream.items()}


def _ring_tables(
    block_ids: np.ndarray, host_block_ids: np.ndarray, num_device_blocks: int, staging: StagingRing
) -> tuple[np.ndarray, np.ndarray]:
    """``([R, *shape], shape)`` arrays such that layer ``l``'s pages of ``block_ids`` are
    ``ring[l % R] + l * strides``: a device block ``b`` is ``b`` with stride D, a host block is its
    staging page in area ``r`` (slot = its rank in ``host_block_ids``) with stride 0."""
    is_host = block_ids >= num_device_blocks
    slots = np.searchsorted(host_block_ids, block_ids)
    area_starts = staging.first_page + np.arange(staging.num_areas) * staging.area_size
    ring = np.where(is_host, area_starts.reshape(-1, *[1] * block_ids.ndim) + slots, block_ids)
    strides = np.where(is_host, 0, num_device_blocks)
    return ring, strides


def _group_layout(
    members: np.ndarray, query_lens: np.ndarray, start_positions: np.ndarray, query_start_loc: np.ndarray
) -> dict[str, np.ndarray]:
    """Host arrays of the group of sequences ``members`` (see AttentionGroup)."""
    member_lens = query_lens[members]
    token_seq_ids = np.repeat(np.arange(len(members)), member_lens)
    member_starts = np.concatenate([[0], np.cumsum(member_lens)])[:-1]
    token_query_ids = np.arange(int(member_lens.sum())) - member_starts[token_seq_ids]
    padded_query_positions = np.zeros((len(members), int(member_lens.max())), dtype=np.int64)
    padded_query_positions[token_seq_ids, token_query_ids] = (
        start_positions[members][token_seq_ids] + token_query_ids
    )
    return dict(
        seq_ids=members,
        token_rows=query_start_loc[members][token_seq_ids] + token_query_ids,
        token_seq_ids=token_seq_ids,
        token_query_ids=token_query_ids,
        padded_query_positions=padded_query_positions,
    )


class PagedAttention(Protocol):
    """What a layer needs from an attention implementation. Page indices come from the metadata."""

    def write_kv(
        self,
        pool: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_pages: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Store the step's new ``k``/``v`` (``[T, kv_heads, head_dim]``) at ``slot_pages`` / ``meta.slot_offsets``."""
        ...

    def attend(
        self,
        q: torch.Tensor,
        pool: torch.Tensor,
        page_table: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """``q [T, heads, head_dim]`` -> ``[T, heads, head_dim]``, attending over ``page_table``'s pages.

        Scores are ``q.k * scale``; None means ``head_dim ** -0.5`` (Gemma 3 uses its own scale).
        """
        ...


class TorchPagedAttention:
    """Portable paged attention: one ``scaled_dot_product_attention`` call per group and layer.

    Each sequence's pages are gathered into a contiguous key range and its queries padded to the
    group's longest; a position mask does the rest. GQA is left to SDPA (``enable_gqa``), so K/V
    are never repeated per query head.
    """

    def write_kv(
        self,
        pool: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_pages: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        pool[slot_pages, 0, meta.slot_offsets] = k
        pool[slot_pages, 1, meta.slot_offsets] = v

    def attend(
        self,
        q: torch.Tensor,
        pool: torch.Tensor,
        page_table: torch.Tensor,
        meta: AttentionMetadata,
        sliding_window: int | None,
        scale: float | None = None,
    ) -> torch.Tensor:
        if len(meta.groups) == 1:
            return self._attend_group(
                q, pool, page_table, meta.groups[0], meta.block_size, sliding_window, scale
            )
        out = torch.empty_like(q)
        for group in meta.groups:
            out[group.token_rows] = self._attend_group(
                q[group.token_rows],
                pool,
                page_table[group.seq_ids],
                group,
                meta.block_size,
                sliding_window,
                scale,
            )
        return out

    def _attend_group(
        self,
        q: torch.Tensor,
        pool: torch.Tensor,
        page_table: torch.Tensor,
        group: AttentionGroup,
        block_size: int,
        sliding_window: int | None,
        scale: float | None,
    ) -> torch.Tensor:
        num_seqs, max_query_len = group.num_seqs, group.max_query_len
        _, num_heads, head_dim = q.shape
        if group.uniform_query_len:
            padded_q = q.view(num_seqs, max_query_len, num_heads, head_dim)
        else:
            padded_q = q.new_zeros(num_seqs, max_query_len, num_heads, head_dim)
            padded_q[group.token_seq_ids, group.token_query_ids] = q
        page_table = page_table[:, : group.num_blocks]
        # [n, blocks, block_size, kv_heads, head_dim] -> [n, kv_heads, keys, head_dim]
        k = pool[:, 0][page_table].flatten(1, 2).transpose(1, 2)
        v = pool[:, 1][page_table].flatten(1, 2).transpose(1, 2)
        mask = group.attention_mask(sliding_window, block_size)
        out = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
        ).transpose(1, 2)
        if group.uniform_query_len:
            return out.reshape(group.num_tokens, num_heads, head_dim)
        return out[group.token_seq_ids, group.token_query_ids]


def make_attention_backend(name: str, device: torch.device) -> PagedAttention:
    """The ``torch`` or ``triton`` backend for ``device`` (``EngineConfig.resolved_attention_backend``).

    Triton is imported only here, when chosen. Off CUDA its kernels run in Triton's interpreter,
    which triton reads from ``TRITON_INTERPRET`` when it first compiles a kernel module: it must be
    set before the process starts, so this refuses rather than silently fail to launch.
    """
    if name == "torch":
        return TorchPagedAttention()
    if name != "triton":
        raise ConfigError(f"unknown attention backend {name!r}; use torch or triton.")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"--attention-backend triton on {device.type} runs in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before starting (it is meant for tests), or use --attention-backend torch."
        )
    try:
        from workers.executor.triton_attention import TritonPagedAttention
    except ImportError as error:
        raise ConfigError(
            f"--attention-backend triton needs the triton package ({error}); install it or use torch."
        ) from error
    return TritonPagedAttention()
