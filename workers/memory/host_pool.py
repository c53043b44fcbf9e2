"""The host KV pool: anonymous shared-memory segments holding host-resident KV blocks.

A segment is a ``memfd`` (no name in /dev/shm at all, so no crash can ever leak one) created by the
memory manager and mapped by the executor through ``/proc/<pid>/fd/<fd>``; it lives exactly as long
as some process maps it or holds its descriptor.

NOTE: DESIGN.md's target is stricter than this: segments sealed against shrinking and handed to the
executors over a Unix socket (SCM_RIGHTS), so the workers need not stay dumpable for ``/proc``
access. That is issue 17's remaining work; until then the descriptor travels by path as above.

Layout of a segment of ``S`` blocks: ``[num_layers, S, 2, block_size, num_kv_heads, head_dim]``.
Layer-major, so one layer's pages of a run of consecutive host blocks are contiguous and stream to
the device as one transfer (DESIGN.md "Streaming").

Under tensor parallelism (DESIGN.md "Parallelism") the memory manager sizes each segment for every
rank's KV heads, and rank ``r`` of ``N`` maps part ``r`` of it: ``[L, S, 2, block_size,
num_kv_heads / N, head_dim]`` at byte ``r * S * rank_block_bytes``, its own heads' slice, contiguous.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch

import proto


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        """One block of one layer: K and V for ``block_size`` tokens."""
        return (2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        """One block across all layers: what a host block costs in host memory."""
        return self.num_layers * self.page_bytes


class HostSegment:
    """``num_blocks`` host blocks backed by one memfd, as a tensor ``[L, S, *page_shape]``."""

    def __init__(
        self, info: proto.HostSegmentInfo, layout: KVLayout, fd: int, owner: bool, part: int = 0, num_parts: int = 1
    ) -> None:
        self.info = info
        self.layout = layout
        self._fd = fd
        self._owner = owner
        part_size = info.num_blocks * layout.block_bytes
        self._mmap = mmap.mmap(fd, num_parts * part_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        count = part_size // layout.dtype.itemsize
        flat = torch.frombuffer(self._mmap, dtype=layout.dtype, count=count, offset=part * part_size)
        self.tensor = flat.view(layout.num_layers, info.num_blocks, *layout.page_shape)
        self.pinned = False

    @classmethod
    def create(cls, segment_id: int, first_block: int, num_blocks: int, layout: KVLayout) -> HostSegment:
        """Memory manager side: allocate exactly ``num_blocks * block_bytes`` bytes."""
        fd = os.memfd_create(f"pied-kv-{segment_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, num_blocks * layout.block_bytes)
        except OSError:
            os.close(fd)
            raise
        info = proto.HostSegmentInfo(segment_id, os.getpid(), fd, first_block, num_blocks)
        return cls(info, layout, fd, owner=True)

    @classmethod
    def attach(
        cls, info: proto.HostSegmentInfo, layout: KVLayout, part: int = 0, num_parts: int = 1
    ) -> HostSegment:
        """Executor side: map a segment another process (or this one) created; with ``num_parts``
        tensor-parallel ranks, part ``part`` of it (``layout``: one rank's)."""
        fd = os.open(f"/proc/{info.pid}/fd/{info.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            return cls(info, layout, fd, owner=False, part=part, num_parts=num_parts)
        finally:
            # The mapping keeps the memory alive; the descriptor is not needed any more.
            os.close(fd)

    def pin(self) -> None:
        """Page-lock in place for asynchronous DMA (CUDA only), in chunks: a single huge
        ``cudaHostRegister`` can fail where several smaller ones succeed."""
        if self.pinned or not torch.cuda.is_available():
            return
        cudart = torch.cuda.cudart()
        base = self.tensor.data_ptr()
        size = self.tensor.numel() * self.tensor.element_size()
        chunk = 1 << 30
        self._pinned_chunks = []
        for offset in range(0, size, chunk):
            length = min(chunk, size - offset)
            status = cudart.cudaHostRegister(base + offset, length, 0)
            if int(status) != 0:
                raise RuntimeError(
                    f"cudaHostRegister failed ({int(status)}) for {length} bytes of host KV: raise the "
                    "memlock limit (LimitMEMLOCK=infinity in the unit, or ulimit -l) or lower --host-kv-gib."
                )
            self._pinned_chunks.append(base + offset)
        self.pinned = True

    def close(self) -> None:
        if self.pinned:
            cudart = torch.cuda.cudart()
            for pointer in self._pinned_chunks:
                cudart.cudaHostUnregister(pointer)
            self.pinned = False
        del self.tensor
        try:
            self._mmap.close()
        except BufferError:
            # A tensor view is still alive somewhere; the mapping goes when it does.
            pass
        if self._owner and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class HostPool:
    """The segments one process has mapped, addressed by host block index ``h = block_id - D``.

    Segments have a fixed number of blocks ``blocks_per_segment`` so ``h`` maps to
    (segment, offset) by division.
    """

    def __init__(self, layout: KVLayout, blocks_per_segment: int) -> None:
        self.layout = layout
        self.blocks_per_segment = blocks_per_segment
        self.segments: dict[int, HostSegment] = {}

    @property
    def num_blocks(self) -> int:
        return sum(s.info.num_blocks for s in self.segments.values())

    def add(self, segment: HostSegment) -> None:
        info = segment.info
        if (
            info.first_block != info.segment_id * self.blocks_per_segment
            or info.num_blocks > self.blocks_per_segment
        ):
            raise ValueError(
                f"host segment {info.segment_id} holds blocks [{info.first_block}, "
                f"{info.first_block + info.num_blocks}), which is not segment {info.segment_id} of "
                f"{self.blocks_per_segment} blocks each: the executor and the memory manager disagree on "
                "blocks_per_segment."
            )
        if info.segment_id in self.segments:
            raise ValueError(f"host segment {info.segment_id} is already mapped.")
        self.segments[info.segment_id] = segment

    def remove(self, segment_id: int) -> None:
        segment = self.segments.pop(segment_id, None)
        if segment is not None:
            segment.close()

    def close(self) -> None:
        for segment_id in list(self.segments):
            self.remove(segment_id)

    def locate(self, host_index: int) -> tuple[HostSegment, int]:
        """(segment, offset in it) of host block ``host_index``; ``ValueError`` if no segment holds it."""
        segment = self.segments.get(host_index // self.blocks_per_segment)
        offset = host_index % self.blocks_per_segment
        if host_index < 0 or segment is None or offset >= segment.info.num_blocks:
            raise ValueError(f"host block {host_index} is in no mapped host segment.")
        return segment, offset

    def runs(self, host_indices: list[int]) -> list[tuple[HostSegment, int, int, int]]:
        """Group sorted host block indices into (segment, offset, count, position-in-list) runs of
        consecutive blocks within one segment: each run is one copy per layer."""
        runs: list[tuple[HostSegment, int, int, int]] = []
        for position, host_index in enumerate(host_indices):
            segment, offset = self.locate(host_index)
            if runs:
                last_segment, last_offset, count, start = runs[-1]
                if last_segment is segment and last_offset + count == offset:
                    runs[-1] = (segment, last_offset, count + 1, start)
                    continue
            runs.append((segment, offset, 1, position))
        return runs
