"""KV block allocators: the device tier's (a free list and a reference count per block) and the host
tier's (lowest id first, only inside the lease the memory manager grants)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable


class BlockManager:
    """Owns which KV blocks are in use. A block is free exactly when its reference count is zero.

    Block ids are ``first_block_id + i`` for ``i`` in ``[0, num_blocks)``. The device tier starts at 0;
    the scheduler's id space continues with host blocks at ``[D, D + H)`` (DESIGN.md "Block ids"),
    which :class:`HostBlockManager` owns.

    Reference counts exist so that prefix caching can share one block between requests:
    ``allocate`` hands out blocks with one reference, ``add_ref`` adds one, ``free`` drops one and
    recycles the block when none are left.
    """

    def __init__(self, num_blocks: int, block_size: int, first_block_id: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_block_id = first_block_id
        self._ref_counts = [0] * num_blocks
        # FIFO: a freed block goes to the back and is reused last. A prefix cache keeps the content
        # of freed blocks until reuse, so this order is the eviction order it wants (LRU).
        self._free_block_ids: deque[int] = deque(range(first_block_id, first_block_id + num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks that are referenced, in [0, 1]."""
        return self.num_used / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[self._index(block_id)]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_block_ids)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks, each with one reference. Check ``can_allocate`` first."""
        free_block_ids = self._free_block_ids
        if num_blocks > len(free_block_ids):
            raise RuntimeError(f"asked for {num_blocks} KV blocks with only {len(free_block_ids)} free.")
        block_ids = [free_block_ids.popleft() for _ in range(num_blocks)]
        ref_counts, first = self._ref_counts, self.first_block_id
        for block_id in block_ids:
            ref_counts[block_id - first] = 1
        return block_ids

    def add_ref(self, block_ids: Iterable[int]) -> None:
        """Share blocks that are already in use (one more reference each)."""
        for block_id in block_ids:
            index = self._index(block_id)
            if self._ref_counts[index] == 0:
                raise ValueError(f"block {block_id} is free; only a block in use can be shared.")
            self._ref_counts[index] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks left with none return to the free list in the
        given order (so a caller frees a sequence tail-first to keep its prefix cached longest)."""
        ref_counts, first = self._ref_counts, self.first_block_id
        for block_id in block_ids:
            index = block_id - first
            if not 0 <= index < self.num_blocks:
                raise ValueError(f"block {block_id} is not in this pool.")
            count = ref_counts[index]
            if count == 0:
                raise ValueError(f"block {block_id} is already free (double free).")
            ref_counts[index] = count - 1
            if count == 1:
                self._free_block_ids.append(block_id)

    def _index(self, block_id: int) -> int:
        index = block_id - self.first_block_id
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"block {block_id} is not in this pool.")
        return index


class HostBlockManager:
    """Owns which host KV blocks are in use: ids ``[first_block_id, first_block_id + num_blocks)``.

    Only the first ``lease`` of them may be handed out (the memory manager backs host memory in
    segments of consecutive ids from the lowest up, and grows or shrinks that prefix). Allocation takes
    the lowest free id, so blocks in use stay packed at the bottom and a shrink leaves few above it.
    The lease may shrink below blocks in use: ``num_used_above_lease`` says how many the holder must
    move or drop before the memory behind them goes away. Host blocks are never shared (no prefix
    cache yet), so a block is simply used or free.
    """

    def __init__(self, num_blocks: int, block_size: int, first_block_id: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"a host pool cannot have {num_blocks} blocks.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_block_id = first_block_id
        self.lease = 0
        self._used = bytearray(num_blocks)
        self._free_block_ids = list(range(first_block_id, first_block_id + num_blocks))  # a min-heap
        self._num_used = 0
        self._num_used_in_lease = 0

    @property
    def num_free(self) -> int:
        """Blocks that ``allocate`` can hand out: free ones inside the lease."""
        return self.lease - self._num_used_in_lease

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_used_above_lease(self) -> int:
        return self._num_used - self._num_used_in_lease

    @property
    def usage(self) -> float:
        """Fraction of the lease in use, in [0, 1] (1 while blocks above a shrunk lease remain)."""
        if self.lease == 0:
            return 1.0 if self._num_used else 0.0
        return min(1.0, self._num_used / self.lease)

    def is_used(self, block_id: int) -> bool:
        return bool(self._used[self._index(block_id)])

    def is_above_lease(self, block_id: int) -> bool:
        return block_id - self.first_block_id >= self.lease

    def set_lease(self, num_blocks: int) -> None:
        if not 0 <= num_blocks <= self.num_blocks:
            raise ValueError(f"a host lease must be in [0, {self.num_blocks}] blocks, got {num_blocks}.")
        self.lease = num_blocks
        self._num_used_in_lease = sum(self._used[:num_blocks])

    def block_ids_above_lease(self) -> list[int]:
        first, used = self.first_block_id, self._used
        return [first + index for index in range(self.lease, self.num_blocks) if used[index]]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Take the ``num_blocks`` lowest free blocks. Check ``can_allocate`` first."""
        if num_blocks > self.num_free:
            raise RuntimeError(
                f"asked for {num_blocks} host KV blocks with only {self.num_free} free in the lease."
            )
        # Every free id inside the lease is in the heap and below every id above it, so the lowest
        # ``num_blocks`` free ids are all inside the lease.
        block_ids = [heapq.heappop(self._free_block_ids) for _ in range(num_blocks)]
        for block_id in block_ids:
            self._used[block_id - self.first_block_id] = 1
        self._num_used += num_blocks
        self._num_used_in_lease += num_blocks
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        used, lease = self._used, self.lease
        for block_id in block_ids:
            index = self._index(block_id)
            if not used[index]:
                raise ValueError(f"host block {block_id} is already free (double free).")
            used[index] = 0
            heapq.heappush(self._free_block_ids, block_id)
            self._num_used -= 1
            if index < lease:
                self._num_used_in_lease -= 1

    def _index(self, block_id: int) -> int:
        index = block_id - self.first_block_id
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"block {block_id} is not in the host pool.")
        return index
