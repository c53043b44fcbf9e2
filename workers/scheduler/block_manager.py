"""KV block allocators: the device tier's (a free list and a reference count per block) and the host
tier's (lowest id first, only inside the lease the memory manager grants).

Both keep the content of freed blocks that the prefix cache names: such a block is free (it counts in
``num_free`` and ``allocate`` may hand it out) but is reused only once no empty block is left, least
recently freed first, and its holder is told (``on_evict``) so the cache can forget it or move it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

EvictionCallback = Callable[[int], None]


class _BlockPool:
    """What both tiers share: per-block reference counts and prefix-cache marks, by block id.

    A subclass owns its empty-block structure and says how a block becomes empty (``_push_empty``).
    """

    num_blocks: int
    first_block_id: int
    _ref_counts: list[int]
    _cached: bytearray
    _cached_free_block_ids: OrderedDict[int, None]
    tier_name = "this pool"

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free_block_ids)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[self._index(block_id)]

    def is_cached(self, block_id: int) -> bool:
        return bool(self._cached[self._index(block_id)])

    def mark_cached(self, block_id: int) -> None:
        """The prefix cache names this block (which is in use): keep its content once it is freed."""
        index = self._index(block_id)
        if self._ref_counts[index] == 0:
            raise ValueError(f"block {block_id} is free; only a block in use can become cached.")
        self._cached[index] = 1

    def unmark_cached(self, block_id: int) -> None:
        """The prefix cache forgot this block: if it is free, it is now simply empty."""
        index = self._index(block_id)
        if not self._cached[index]:
            return
        self._cached[index] = 0
        if self._ref_counts[index] == 0:
            del self._cached_free_block_ids[block_id]
            self._push_empty(block_id)

    def add_ref(self, block_ids: Iterable[int]) -> None:
        """Share blocks that are in use, or revive free cached ones (one more reference each)."""
        for block_id in block_ids:
            index = self._index(block_id)
            if self._ref_counts[index] == 0:
                if not self._cached[index]:
                    raise ValueError(
                        f"block {block_id} of {self.tier_name} is free; only a block in use or cached "
                        "can be shared."
                    )
                del self._cached_free_block_ids[block_id]
                self._revived(index)
            self._ref_counts[index] += 1

    def _revived(self, index: int) -> None:
        """A free cached block is in use again (before its reference count rises)."""

    def _push_empty(self, block_id: int) -> None:
        raise NotImplementedError

    def _index(self, block_id: int) -> int:
        index = block_id - self.first_block_id
        if not 0 <= index < self.num_blocks:
            raise ValueError(f"block {block_id} is not in {self.tier_name}.")
        return index


class BlockManager(_BlockPool):
    """Owns which KV blocks are in use. A block is free exactly when its reference count is zero.

    Block ids are ``first_block_id + i`` for ``i`` in ``[0, num_blocks)``. The device tier starts at 0;
    the scheduler's id space continues with host blocks at ``[D, D + H)`` (DESIGN.md "Block ids"),
    which :class:`HostBlockManager` owns.

    Reference counts exist so that prefix caching can share one block between requests:
    ``allocate`` hands out blocks with one reference, ``add_ref`` adds one, ``free`` drops one and
    recycles the block when none are left. A free block marked cached (``mark_cached``) keeps its
    content until ``allocate`` needs it, after every empty block: ``add_ref`` can revive it meanwhile.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        first_block_id: int = 0,
        on_evict: EvictionCallback | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_block_id = first_block_id
        # Called with a cached block that ``allocate`` is handing out (already unmarked and held).
        self.on_evict = on_evict
        self._ref_counts = [0] * num_blocks
        # FIFO: a freed block goes to the back and is reused last.
        self._free_block_ids: deque[int] = deque(range(first_block_id, first_block_id + num_blocks))
        # Free blocks whose content is cached, least recently freed first: the eviction order (LRU).
        self._cached_free_block_ids: OrderedDict[int, None] = OrderedDict()
        self._cached = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out: empty ones and free cached ones."""
        return len(self._free_block_ids) + len(self._cached_free_block_ids)

    @property
    def num_empty(self) -> int:
        """Free blocks holding nothing the prefix cache wants: taking one evicts nothing."""
        return len(self._free_block_ids)

    @property
    def num_used(self) -> int:
        """Referenced blocks (a free cached block is not in use)."""
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks that are referenced, in [0, 1]."""
        return self.num_used / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks, each with one reference: empty ones first, then cached ones
        (least recently freed first, each reported to ``on_evict``). Check ``can_allocate`` first."""
        free_block_ids = self._free_block_ids
        if num_blocks > self.num_free:
            raise RuntimeError(f"asked for {num_blocks} KV blocks with only {self.num_free} free.")
        num_empty = min(num_blocks, len(free_block_ids))
        block_ids = [free_block_ids.popleft() for _ in range(num_empty)]
        ref_counts, first = self._ref_counts, self.first_block_id
        for block_id in block_ids:
            ref_counts[block_id - first] = 1
        for _ in range(num_blocks - num_empty):
            block_id, _ = self._cached_free_block_ids.popitem(last=False)
            ref_counts[block_id - first] = 1
            self._cached[block_id - first] = 0
            if self.on_evict is not None:
                self.on_evict(block_id)
            block_ids.append(block_id)
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks left with none become free in the given order (so
        a caller frees a sequence tail-first to keep its prefix cached longest)."""
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
                if self._cached[index]:
                    self._cached_free_block_ids[block_id] = None
                else:
                    self._free_block_ids.append(block_id)

    def _push_empty(self, block_id: int) -> None:
        self._free_block_ids.append(block_id)


class HostBlockManager(_BlockPool):
    """Owns which host KV blocks are in use: ids ``[first_block_id, first_block_id + num_blocks)``.

    Only the first ``lease`` of them may be handed out (the memory manager backs host memory in
    segments of consecutive ids from the lowest up, and grows or shrinks that prefix). Allocation takes
    the lowest empty id, so blocks in use stay packed at the bottom and a shrink leaves few above it;
    free cached blocks (prefix caching) come after every empty one, least recently freed first.
    The lease may shrink below blocks in use: ``num_used_above_lease`` says how many the holder must
    move or drop before the memory behind them goes away. Free cached blocks above a shrunk lease are
    forgotten at once (``on_evict``), and so is a cached block freed above it: that memory is leaving.
    Blocks are reference counted like the device tier's (prefix caching shares them under kv_policy pie).
    """

    tier_name = "the host pool"

    def __init__(
        self, num_blocks: int, block_size: int, first_block_id: int, on_evict: EvictionCallback | None = None
    ) -> None:
        if num_blocks < 0:
            raise ValueError(f"a host pool cannot have {num_blocks} blocks.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_block_id = first_block_id
        self.on_evict = on_evict
        self.lease = 0
        self._ref_counts = [0] * num_blocks
        self._cached = bytearray(num_blocks)
        self._in_use = bytearray(num_blocks)  # 1 where referenced: a C-speed scan finds the highest
        # Empty free blocks, a min-heap; it may hold ids above the lease, which are never handed out.
        self._free_block_ids = list(range(first_block_id, first_block_id + num_blocks))
        # Free cached blocks, all inside the lease, least recently freed first.
        self._cached_free_block_ids: OrderedDict[int, None] = OrderedDict()
        self._num_used = 0
        self._num_used_in_lease = 0

    @property
    def num_free(self) -> int:
        """Blocks that ``allocate`` can hand out: free ones inside the lease, cached ones included."""
        return self.lease - self._num_used_in_lease

    @property
    def num_used(self) -> int:
        """Referenced blocks (a free cached block is not in use)."""
        return self._num_used

    @property
    def num_used_above_lease(self) -> int:
        return self._num_used - self._num_used_in_lease

    @property
    def high_water(self) -> int:
        """One past the highest index in use (0: none): a lease at least this large needs no block moved."""
        return self._in_use.rfind(1) + 1

    @property
    def usage(self) -> float:
        """Fraction of the lease in use, in [0, 1] (1 while blocks above a shrunk lease remain)."""
        if self.lease == 0:
            return 1.0 if self._num_used else 0.0
        return min(1.0, self._num_used / self.lease)

    def is_used(self, block_id: int) -> bool:
        return self._ref_counts[self._index(block_id)] > 0

    def is_above_lease(self, block_id: int) -> bool:
        return block_id - self.first_block_id >= self.lease

    def set_lease(self, num_blocks: int) -> None:
        if not 0 <= num_blocks <= self.num_blocks:
            raise ValueError(f"a host lease must be in [0, {self.num_blocks}] blocks, got {num_blocks}.")
        self.lease = num_blocks
        if self._cached_free_block_ids:
            end = self.first_block_id + num_blocks
            for block_id in [block_id for block_id in self._cached_free_block_ids if block_id >= end]:
                del self._cached_free_block_ids[block_id]
                self._forget(block_id)
                heapq.heappush(self._free_block_ids, block_id)
        self._num_used_in_lease = sum(count > 0 for count in self._ref_counts[:num_blocks])

    def block_ids_above_lease(self) -> list[int]:
        first, ref_counts = self.first_block_id, self._ref_counts
        return [first + index for index in range(self.lease, self.num_blocks) if ref_counts[index]]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks inside the lease, each with one reference: the lowest empty ids
        first, then the least recently freed cached ones. Check ``can_allocate`` first."""
        if num_blocks > self.num_free:
            raise RuntimeError(
                f"asked for {num_blocks} host KV blocks with only {self.num_free} free in the lease."
            )
        free_block_ids, first, ref_counts = self._free_block_ids, self.first_block_id, self._ref_counts
        end = first + self.lease
        block_ids = []
        for _ in range(num_blocks):
            # The heap's lowest id is inside the lease while any empty block there is free.
            if free_block_ids and free_block_ids[0] < end:
                block_id = heapq.heappop(free_block_ids)
            else:
                block_id, _ = self._cached_free_block_ids.popitem(last=False)
                self._forget(block_id)
            ref_counts[block_id - first] = 1
            self._in_use[block_id - first] = 1
            block_ids.append(block_id)
        self._num_used += num_blocks
        self._num_used_in_lease += num_blocks
        return block_ids

    def _revived(self, index: int) -> None:
        self._num_used += 1
        self._num_used_in_lease += 1  # free cached blocks are all inside the lease
        self._in_use[index] = 1

    def free(self, block_ids: Iterable[int]) -> None:
        ref_counts, lease = self._ref_counts, self.lease
        for block_id in block_ids:
            index = self._index(block_id)
            count = ref_counts[index]
            if not count:
                raise ValueError(f"host block {block_id} is already free (double free).")
            ref_counts[index] = count - 1
            if count > 1:
                continue
            self._num_used -= 1
            self._in_use[index] = 0
            if index < lease:
                self._num_used_in_lease -= 1
                if self._cached[index]:
                    self._cached_free_block_ids[block_id] = None
                    continue
            elif self._cached[index]:
                self._forget(block_id)
            heapq.heappush(self._free_block_ids, block_id)

    def _forget(self, block_id: int) -> None:
        """A cached block's content is being dropped by this pool (reused, or above the lease)."""
        self._cached[block_id - self.first_block_id] = 0
        if self.on_evict is not None:
            self.on_evict(block_id)

    def _push_empty(self, block_id: int) -> None:
        heapq.heappush(self._free_block_ids, block_id)
