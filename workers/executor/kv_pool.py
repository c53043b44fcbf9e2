"""The device KV page pool: one flat tensor of pages shared by every layer (DESIGN.md "KV memory").

A page holds ``block_size`` tokens of one layer's K and V: the pool is
``[num_pages, 2, block_size, num_kv_heads, head_dim]`` (index 0 of dim 1 is K, 1 is V). Device
block ``b`` of layer ``l`` is page ``l * D + b`` where ``D = num_device_blocks``, so a paged
attention kernel given (pool, page table) works unchanged on every layer. Pages after the
``L * D`` device pages (``num_extra_pages``) hold the staging ring of host pooling (``StagingRing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from proto.config import ConfigError

GIB = 1 << 30


def kv_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block costs across all layers (a block id owns one page per layer)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * element_size


def num_blocks_that_fit(num_bytes: float, bytes_per_block: int) -> int:
    """How many whole blocks fit in ``num_bytes``."""
    return int(num_bytes // bytes_per_block)


@dataclass(frozen=True)
class StagingRing:
    """The device pages a step's host blocks are streamed into (DESIGN.md "Streaming").

    ``num_areas`` (R) areas of ``area_size`` (M) pages each, starting at page ``first_page`` (the
    first page after the ``L * D`` device pages). Layer ``l`` uses area ``l % R``; a step's host
    block with staging slot ``s`` is page ``area_start(l) + s`` in layer ``l``.
    """

    first_page: int
    num_areas: int
    area_size: int

    @property
    def num_pages(self) -> int:
        return self.num_areas * self.area_size

    def area_start(self, layer: int) -> int:
        return self.first_page + (layer % self.num_areas) * self.area_size


class KVPool:
    """Owns the page tensor; knows nothing about which sequence uses which block."""

    def __init__(
        self,
        num_layers: int,
        num_device_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        num_extra_pages: int = 0,
    ) -> None:
        if num_device_blocks < 1:
            raise ValueError(f"the KV pool needs at least one device block, got {num_device_blocks}.")
        self.num_layers = num_layers
        self.num_device_blocks = num_device_blocks
        self.block_size = block_size
        self.num_extra_pages = num_extra_pages
        # Zeroed, not empty: attention reads whole pages, and a masked slot still multiplies its V
        # by a zero weight, which only gives zero if the never-written V is finite.
        self.pages = torch.zeros(
            (num_layers * num_device_blocks + num_extra_pages, 2, block_size, num_kv_heads, head_dim),
            dtype=dtype,
            device=device,
        )

    @property
    def num_device_pages(self) -> int:
        return self.num_layers * self.num_device_blocks

    @property
    def extra_pages(self) -> torch.Tensor:
        """The pages after the device pages (a view), where staging areas live."""
        return self.pages[self.num_device_pages :]

    def resize_extra_pages(self, num_extra_pages: int) -> None:
        """Reallocate the pool with ``num_extra_pages`` pages after the device pages (a staging
        ring of a new shape), keeping every device page's content; the old pool's memory goes back
        (on CUDA to the caching allocator, for the next allocation).

        NOTE: only between steps, with no copy in flight and nothing holding a view of the old
        pages (the caller re-derives its views from ``pages``). On CUDA the device pages exist
        twice while they are copied: a resize is rare (``workers.memory.prefetch`` hysteresis).
        """
        if num_extra_pages < 0:
            raise ValueError(f"num_extra_pages must be non-negative, got {num_extra_pages}.")
        if num_extra_pages == self.num_extra_pages:
            return
        old, count = self.pages, self.num_device_pages
        pages = torch.zeros((count + num_extra_pages, *old.shape[1:]), dtype=old.dtype, device=old.device)
        pages[:count].copy_(old[:count])
        self.pages = pages
        self.num_extra_pages = num_extra_pages
        del old

    @property
    def nbytes(self) -> int:
        return self.pages.numel() * self.pages.element_size()

    def layer_page_offset(self, layer: int) -> int:
        """Page index of device block 0 in ``layer``: block ``b`` is page ``offset + b``."""
        return layer * self.num_device_blocks

    def layer_pages(self, layer: int) -> torch.Tensor:
        """The device pages of one layer, indexed by device block id (a view)."""
        offset = self.layer_page_offset(layer)
        return self.pages[offset : offset + self.num_device_blocks]


@dataclass(frozen=True)
class DeviceMemoryProfile:
    """What one CUDA device holds besides the KV pool, measured after the weights load
    (``ModelRunner._profile_device_memory``); bytes."""

    total: int  # the device's memory
    weights: int  # allocated once the weights are loaded
    peak_activations: int  # the largest step's temporaries beyond the weights (a dummy forward)
    graph_pool: int  # the CUDA graphs' shared memory pool (estimated: the largest decode's temporaries)
    free: int  # free once the weights are loaded (other processes may hold part of the device)


def num_profiled_kv_blocks(
    profile: DeviceMemoryProfile, utilization: float, reserved_bytes: int, block_bytes: int
) -> int:
    """Device KV blocks under ``--gpu-memory-utilization`` (vLLM's meaning: the fraction of the
    device's whole memory this engine may use): ``utilization * total`` less the weights, the
    largest step's activations, the graph pool and ``reserved_bytes`` (the staging ring and the
    scratch page), in blocks of ``block_bytes``; never more than what is free besides the weights
    (another process may hold part of the device). Raises ConfigError when no block fits."""
    available = min(utilization * profile.total - profile.weights, profile.free)
    budget = available - profile.peak_activations - profile.graph_pool
    num_blocks = num_blocks_that_fit(budget - reserved_bytes, block_bytes)
    if num_blocks < 1:
        raise ConfigError(
            f"--gpu-memory-utilization {utilization} of {profile.total / GIB:.2f} GiB leaves no KV block "
            f"({block_bytes} bytes each) after {profile.weights / GIB:.2f} GiB of weights, "
            f"{profile.peak_activations / GIB:.2f} GiB of activations at --max-num-batched-tokens, "
            f"{profile.graph_pool / GIB:.2f} GiB for CUDA graphs and {reserved_bytes / GIB:.2f} GiB of "
            "staging; raise it, lower --max-num-batched-tokens or --max-num-seqs, or set --device-kv-blocks."
        )
    return num_blocks
