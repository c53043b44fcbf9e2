"""Host segments made by the rank that uses them: the segment source of a rank on another machine
than the memory manager (``--nnodes`` above 1, DESIGN.md "Parallelism").

A memfd cannot cross machines, and need not: a rank reads and writes only its own part of each host
segment (its KV heads' slice of every block), and nothing else touches a segment's bytes: the
memory manager only creates, leases and releases segments (block ids and lease accounting), the
scheduler only counts blocks. So a remote rank creates its part of each segment the SegmentUpdate
names itself, at its exact size and sealed like the memory manager's, maps it and closes the
descriptor; the update's detach unmaps it, as it would the memory manager's. A segment's bytes live
exactly as long as on one machine (from attach to detach), so swaps and prefix-cache hits on host
blocks read what this rank wrote.
"""

from __future__ import annotations

import fcntl
import os

import proto
from proto.config import EngineConfig
from workers.memory.host_pool import SEALS
from workers.plan import plan_of


class LocalSegments:
    """A :data:`~workers.memory.host_pool.SegmentFdSource` that creates each segment's part here:
    ``rank_block_bytes`` per block (one rank's slice of a block across all layers)."""

    def __init__(self, rank_block_bytes: int) -> None:
        self.rank_block_bytes = rank_block_bytes

    def open(self, info: proto.HostSegmentInfo) -> int:
        """A new sealed memfd for this rank's part of segment ``info`` (the caller maps and closes it)."""
        fd = os.memfd_create(f"pied-kv-{info.segment_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, info.num_blocks * self.rank_block_bytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @classmethod
    def for_config(cls, config: EngineConfig) -> LocalSegments:
        """This rank's part of a host block under ``config``'s plan (0 bytes without host KV)."""
        return cls(plan_of(config).host.block_bytes // config.tensor_parallel_size)

    def close(self) -> None:
        """Nothing to close: each descriptor went to its mapping."""
