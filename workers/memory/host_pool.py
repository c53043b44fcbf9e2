"""The host KV pool: anonymous shared-memory segments holding host-resident KV blocks.

A segment is a ``memfd`` (no name in /dev/shm at all, so no crash can ever leak one) created by the
memory manager at its exact size and then sealed (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``):
no process, not even one of the same user holding the descriptor, can shrink it under a mapping
(which would SIGBUS every mapper) or grow it, and the seals cannot be lifted. Its descriptor reaches
the executor over a Unix socket (SCM_RIGHTS, :mod:`workers.fd_channel`), never through
``/proc/<pid>/fd``, so every worker can be non-dumpable; the executor refuses a segment that is not
sealed or not of the expected size, maps it and closes the descriptor at once. A segment lives
exactly as long as some process maps it or holds its descriptor.

Layout of a segment of ``S`` blocks: ``[num_layers, S, 2, block_size, num_kv_heads, head_dim]``.
Layer-major, so one layer's pages of a run of consecutive host blocks are contiguous and stream to
the device as one transfer (DESIGN.md "Streaming").

Under tensor parallelism (DESIGN.md "Parallelism") the memory manager sizes each segment for every
rank's KV heads, and rank ``r`` of ``N`` maps part ``r`` of it: ``[L, S, 2, block_size,
num_kv_heads / N, head_dim]`` at byte ``r * S * rank_block_bytes``, its own heads' slice, contiguous.
A rank on another machine (``--nnodes``) cannot map the memory manager's memfd: it makes its own part
of each segment instead (:mod:`workers.executor.local_segments`), and the memory manager's parts for
it stay untouched (a memfd's pages are allocated when first written).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

import proto
from workers.memory.shared_mapping import map_shared

# Sealed once sized: no shrink (a SIGBUS in every mapper), no grow, and no further change of seals.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# What gives a mapper a segment's descriptor: the fd channel's client in a worker, or
# :func:`local_segment_fds` in one process. ``None``: the segment was released before it was mapped.
SegmentFdSource = Callable[[proto.HostSegmentInfo], int | None]

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
        self._fd = fd if owner else -1  # a mapper keeps no descriptor: the mapping holds the memory
        self._owner = owner
        # Under tensor parallelism a segment holds one part per rank (``layout``: one rank's) and a
        # rank maps the whole segment but views only its own part.
        buffer, self._release = map_shared(fd, num_parts * self.num_bytes)
        flat = torch.frombuffer(
            buffer, dtype=layout.dtype, count=self.num_bytes // layout.dtype.itemsize, offset=part * self.num_bytes
        )
        self.tensor = flat.view(layout.num_layers, info.num_blocks, *layout.page_shape)

    @property
    def num_bytes(self) -> int:
        return self.info.num_blocks * self.layout.block_bytes

    @property
    def address(self) -> int:
        """Where the mapping starts in this process (what CUDA registers)."""
        return self.tensor.data_ptr()

    @property
    def fd(self) -> int:
        """The memfd (memory manager side only: a mapper closed its copy once mapped)."""
        if not self._owner or self._fd < 0:
            raise ValueError(f"host segment {self.info.segment_id} holds no descriptor in this process.")
        return self._fd

    @classmethod
    def create(cls, segment_id: int, first_block: int, num_blocks: int, layout: KVLayout) -> HostSegment:
        """Memory manager side: allocate exactly ``num_blocks * block_bytes`` bytes, sealed at that size."""
        fd = os.memfd_create(f"pied-kv-{segment_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, num_blocks * layout.block_bytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            info = proto.HostSegmentInfo(segment_id, os.getpid(), fd, first_block, num_blocks)
            return cls(info, layout, fd, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(
        cls, info: proto.HostSegmentInfo, layout: KVLayout, fd: int, part: int = 0, num_parts: int = 1
    ) -> HostSegment:
        """Mapper side: map ``fd`` (received for ``info``) and close it, whatever happens; with
        ``num_parts`` tensor-parallel ranks, part ``part`` of it (``layout``: one rank's)."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & SEALS != SEALS:
                raise ValueError(
                    f"host segment {info.segment_id} is not sealed against resizing (seals {seals:#x}): "
                    "refusing to map memory another process could shrink under this one."
                )
            size = os.fstat(fd).st_size
            expected = num_parts * info.num_blocks * layout.block_bytes
            if size != expected:
                raise ValueError(
                    f"host segment {info.segment_id} is {size} bytes, not the {expected} its "
                    f"{info.num_blocks} blocks need: the executor and the memory manager disagree on the KV layout."
                )
            return cls(info, layout, fd, owner=False, part=part, num_parts=num_parts)
        finally:
            # The mapping keeps the memory alive; the descriptor is not needed any more.
            os.close(fd)

    def close(self) -> None:
        """Unmap (and, memory manager side, close the memfd). On CUDA the executor unregisters the
        segment first (``workers.executor.host_registration``)."""
        del self.tensor
        # Unmapped now if no view is left; else the pages go now and the range with the last view.
        self._release()
        if self._owner and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def local_segment_fds(segments: Iterable[HostSegment]) -> SegmentFdSource:
    """A :data:`SegmentFdSource` for segments created in this process (tests, benchmarks that
    drive a runner without the memory manager): a duplicate of each one's descriptor."""
    by_key = {(segment.info.segment_id, segment.info.fd): segment for segment in segments}

    def open_fd(info: proto.HostSegmentInfo) -> int | None:
        segment = by_key.get((info.segment_id, info.fd))
        return None if segment is None else os.dup(segment.fd)

    return open_fd


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
