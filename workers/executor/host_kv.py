"""The executor's side of host memory (``HostKV``): the mapped host pool, the copy engine (started on
first use, so a runner that never sees a host block never starts one), the staging ring, whole-block
swaps (the ``swap`` baseline), the link bandwidth probe, and the prefetch one step hands the next.

Segments arrive as descriptors (from the memory manager over the fd channel, SCM_RIGHTS), are
mapped and the descriptors closed at once; on CUDA each is registered once, when mapped, and
unregistered before it is unmapped (:mod:`workers.executor.host_registration`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

import proto
from workers.executor.copy_engine import CopyEngine, CudaCopyEngine, ThreadCopyEngine, Transfer
from workers.executor.host_registration import HostRegistrar
from workers.executor.kv_pool import StagingRing
from workers.executor.streaming import (
    HostBlockOwners,
    LayerStreamer,
    Prefetch,
    StreamStats,
    use_host_page_kernel,
)
from workers.memory.host_pool import HostPool, HostSegment, KVLayout, SegmentFdSource

logger = logging.getLogger(__name__)


class HostKV:
    """The executor's side of host KV: mapped segments, the copy engine, the staging ring, swaps."""

    def __init__(
        self,
        layout: KVLayout,
        pages: torch.Tensor,
        num_device_blocks: int,
        ring: StagingRing | None,
        blocks_per_segment: int,
        device: torch.device,
        throttle_bytes_per_s: float | None = None,
        host_page_kernel: bool | None = None,
        registrar: HostRegistrar | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        """``registrar``: registers segments with CUDA (default: one on a CUDA device, none elsewhere);
        ``part``: (rank, ranks) under tensor parallelism: which part of each segment is this rank's."""
        self.layout = layout
        self.part = part
        self.pages = pages
        self.num_device_blocks = num_device_blocks
        self.ring = ring
        self.pool = HostPool(layout, blocks_per_segment)
        self.device = device
        self.throttle_bytes_per_s = throttle_bytes_per_s
        self.prefetched: Prefetch | None = None
        self._engine: CopyEngine | None = None
        # Streaming moves pages by kernel through these lists (see streaming.use_host_page_kernel).
        self.page_lists = None
        if ring is not None and use_host_page_kernel(device.type, host_page_kernel):
            from workers.executor.triton_host_pages import HostPageLists

            self.page_lists = HostPageLists(ring.area_size, device)
        if registrar is None and device.type == "cuda":
            registrar = HostRegistrar(device)
        self.registrar = registrar

    @property
    def engine(self) -> CopyEngine:
        """Started on first use: a runner without host blocks never has a copy thread or stream."""
        if self._engine is None:
            if self.device.type == "cuda":
                self._engine = CudaCopyEngine(self.device)
            else:
                self._engine = ThreadCopyEngine(self.throttle_bytes_per_s)
        return self._engine

    def set_throttle(self, bytes_per_s: float | None) -> None:
        """Tests and benchmarks only (``copy_throttle``): cap the CPU copy thread from the next batch."""
        self.throttle_bytes_per_s = bytes_per_s
        if isinstance(self._engine, ThreadCopyEngine):
            self._engine.set_throttle(bytes_per_s)

    def attach(self, infos: list[proto.HostSegmentInfo], open_fd: SegmentFdSource) -> None:
        """Map segments ``infos``, each one's descriptor from ``open_fd`` (closed once mapped)."""
        for info in infos:
            fd = open_fd(info)
            if fd is None:
                # Released before this executor got to it: no plan can use its blocks.
                logger.info("host segment %d was released before it was mapped; skipped", info.segment_id)
                continue
            segment = HostSegment.attach(info, self.layout, fd, *self.part)
            try:
                if self.registrar is not None:
                    self.registrar.register(segment)
                self.pool.add(segment)
            except BaseException:
                self._unmap(segment)
                raise

    def detach(self, segment_ids: list[int]) -> None:
        # NOTE: nothing may still read or write a segment when it is unmapped: drain the copy engine
        # (a prefetch may be in flight) and forget the prefetch, whose views point into it.
        self.drain()
        for segment_id in segment_ids:
            segment = self.pool.segments.pop(segment_id, None)
            if segment is not None:
                self._unmap(segment)

    def _unmap(self, segment: HostSegment) -> None:
        if self.registrar is not None:
            self.registrar.unregister(segment)
        segment.close()

    def drain(self) -> None:
        """Every submitted copy done, no prefetch kept."""
        self.prefetched = None
        if self._engine is not None:
            self._engine.synchronize()

    def set_ring(self, pages: torch.Tensor, ring: StagingRing | None) -> None:
        """The pool was reallocated with a new staging ring (``ModelRunner.resize_staging``, after
        ``drain``): device pages and host blocks are unchanged, staging areas start empty."""
        assert self.prefetched is None, "drain before reshaping the ring: a prefetch points into it"
        self.pages = pages
        self.ring = ring

    def close(self) -> None:
        self.drain()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self.detach(list(self.pool.segments))

    def measure_link_bandwidth(self, max_bytes: int = 32 << 20, repeats: int = 3) -> float:
        """Host -> device bytes/s through this copy engine, from pinned host pages into the staging
        ring (unused before the first step): the controller's prior, so its first decision can jump
        instead of growing blindly until stalls reveal the link. 0 without a staging ring."""
        if self.ring is None:
            return 0.0
        count = max(1, min(self.ring.num_pages, max_bytes // self.layout.page_bytes))
        staging = self.pages[self.ring.first_page : self.ring.first_page + count]
        source = torch.zeros(staging.shape, dtype=staging.dtype, pin_memory=self.device.type == "cuda")
        num_bytes = count * self.layout.page_bytes
        self.engine.synchronize(self.engine.submit([(staging, source)], num_bytes))  # warm-up
        seconds = 0.0
        for _ in range(repeats):
            ticket = self.engine.submit([(staging, source)], num_bytes)
            self.engine.synchronize(ticket)
            seconds += ticket.copy_time()
        # Stopped again: the engine starts on the first step that streams, as it would have.
        self._engine.close()
        self._engine = None
        return repeats * num_bytes / seconds if seconds > 0 else 0.0

    def take_prefetch(self) -> Prefetch | None:
        prefetch, self.prefetched = self.prefetched, None
        return prefetch

    def streamer(
        self,
        host_block_ids: np.ndarray,
        written_host_block_ids: np.ndarray,
        owners: HostBlockOwners | None = None,
    ) -> LayerStreamer:
        return LayerStreamer(self, host_block_ids, written_host_block_ids, owners)

    def swap(self, swap_out: np.ndarray, swap_in: np.ndarray) -> StreamStats:
        """Copy whole blocks (every layer) across tiers, ``swap_out`` (device -> host) first, then
        ``swap_in`` (host -> device); the host waits until both are done. Pairs are ``[k, 2]``."""
        # NOTE: swap_out writes host blocks a prefetch may have read: those pages are stale now.
        if self.prefetched is not None and len(swap_out):
            self.prefetched.invalidate(swap_out[:, 1].tolist())
        transfers = self._block_copies(swap_out, to_host=True) + self._block_copies(swap_in, to_host=False)
        stats = StreamStats(
            bytes_to_host=len(swap_out) * self.layout.block_bytes,
            bytes_to_device=len(swap_in) * self.layout.block_bytes,
        )
        if transfers:
            ticket = self.engine.submit(transfers, stats.bytes_to_host + stats.bytes_to_device)
            self.engine.synchronize(ticket)
            stats.copy_time = ticket.copy_time()
        return stats

    def _block_copies(self, pairs: np.ndarray, to_host: bool) -> list[Transfer]:
        """One transfer per layer per run of pairs whose device blocks and host slots both advance by one."""
        if len(pairs) == 0:
            return []
        num_device_blocks = self.num_device_blocks
        device_ids, host_ids = (pairs[:, 0], pairs[:, 1]) if to_host else (pairs[:, 1], pairs[:, 0])
        direction = "swap_out (device -> host)" if to_host else "swap_in (host -> device)"
        if device_ids.min() < 0 or device_ids.max() >= num_device_blocks:
            raise ValueError(f"{direction}: device block ids must be in [0, {num_device_blocks}).")
        if host_ids.min() < num_device_blocks:
            raise ValueError(f"{direction}: host block ids must be at least {num_device_blocks}.")
        runs: list[tuple[HostSegment, int, int, int]] = []  # (segment, offset, device block, count)
        for device_id, host_id in zip(device_ids.tolist(), host_ids.tolist()):
            segment, offset = self.pool.locate(host_id - num_device_blocks)
            if runs:
                last_segment, last_offset, last_device, count = runs[-1]
                if (
                    last_segment is segment
                    and last_offset + count == offset
                    and last_device + count == device_id
                ):
                    runs[-1] = (segment, last_offset, last_device, count + 1)
                    continue
            runs.append((segment, offset, device_id, 1))
        transfers = []
        for layer in range(self.layout.num_layers):
            base = layer * num_device_blocks
            for segment, offset, device_id, count in runs:
                device = self.pages[base + device_id : base + device_id + count]
                host = segment.tensor[layer, offset : offset + count]
                transfers.append((host, device) if to_host else (device, host))
        return transfers
