"""The device tier's KV block allocator: a free list and a reference count per block."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class BlockManager:
    """Owns which KV blocks are in use. A block is free exactly when its reference count is zero.

    Block ids are ``first_block_id + i`` for ``i`` in ``[0, num_blocks)``. The device tier starts at 0;
    the scheduler's id space continues with host blocks at ``[D, D + H)`` (DESIGN.md "Block ids"),
    which another instance with ``first_block_id=D`` can own.

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
