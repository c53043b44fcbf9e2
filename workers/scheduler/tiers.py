"""Where a sequence's KV blocks live (device or host tier) and the whole-block copies that move them.

The scheduler's block id space is ``[0, D)`` device blocks and ``[D, D + H_max)`` host blocks
(DESIGN.md "Block ids"). A sequence's block table may mix both; the executor streams the host ones.
Moving a block between tiers is a copy the next StepPlan carries: ``swap_out`` (device -> host) and
``swap_in`` (host -> device), run by the executor before the forward pass, swap_out first.

With prefix caching, cached content moves with its block: whenever a copy moves a cached block, the
cache's name for it moves to the copy's destination; an evicted cached device block is demoted (copied
to a free host block inside the lease) rather than forgotten while the host tier has room.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from itertools import chain

from workers.scheduler.block_manager import BlockManager, HostBlockManager
from workers.scheduler.prefix_cache import PrefixCache


class BlockTiers:
    """The device and host block pools behind one id space, where a sequence's new blocks go, the
    prefix cache over both, and the copies between tiers that the next plan must carry.

    With ``pooling`` (kv_policy pie) a running sequence may hold host blocks inside the lease: new
    blocks go to the device first; when it is short, full blocks go to the host and the sequence's
    tail (the block being appended to) stays on the device, so steady-state decode only reads host
    blocks. Without pooling, running sequences hold device blocks only and host blocks hold swapped-out
    sequences (kv_policy swap) and demoted cached blocks.

    NOTE: the executor runs a plan's swap_out copies, then its swap_in copies, then the forward pass.
    Copies gathered for one plan stay correct under any later reuse of blocks because:
    - a device block freed by a swap_out may be reused at once: its content is read first (even
      as the destination of a swap_in of the same plan: a bounce between two host blocks); this is
      how an evicted cached device block is demoted while its new owner already has it;
    - a host block read by a swap_in stays allocated until the plan is made, so no swap_out of the
      same plan overwrites it before it is read;
    - a device block written by a swap_in is never the source of a swap_out in the same plan (that
      would copy its old content), and no block is the source of two swap_outs;
    - freeing a block's last reference drops the pending copies into it (its content is dead), so no
      two copies of one plan write the same block - unless the copy carries cached content: a
      swap_out into a cached host block still runs (the host block stays cached, and is free), and
      a swap_in into a cached device block is undone instead, its name going back to the host block
      it would have read;
    - a host block that is the destination of a pending demotion is free (cached): reusing or
      forgetting it drops that copy, and a hit on it reads it after the swap_out has filled it.
    """

    def __init__(
        self,
        num_device_blocks: int,
        num_host_blocks: int,
        block_size: int,
        pooling: bool,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.device = BlockManager(num_device_blocks, block_size, on_evict=self._evict_device_block)
        self.host = HostBlockManager(
            num_host_blocks, block_size, first_block_id=num_device_blocks, on_evict=self._evict_host_block
        )
        self.num_device_blocks = num_device_blocks
        self.block_size = block_size
        self.pooling = pooling
        self.cache = prefix_cache
        self._swap_out: list[tuple[int, int]] = []  # (device id, host id), for the next plan
        self._swap_out_sources: set[int] = set()
        self._swap_in: list[tuple[int, int]] = []  # (host id, device id), for the next plan

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks a running sequence can still take."""
        if self.pooling:
            return self.device.num_free + self.host.num_free
        return self.device.num_free

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def is_above_lease(self, block_id: int) -> bool:
        return block_id >= self.num_device_blocks and self.host.is_above_lease(block_id)

    def ref_count(self, block_id: int) -> int:
        if block_id < self.num_device_blocks:
            return self.device.ref_count(block_id)
        return self.host.ref_count(block_id)

    # ---------------------------------------------------------------- running sequences

    def allocate(self, block_table: array, num_blocks: int, num_computed_tokens: int) -> None:
        """Append ``num_blocks`` new blocks to a running sequence's table; check ``can_allocate`` first.

        Device blocks first. Short of device blocks (pooling), the first new blocks - full once this
        step has run - go to the host and the last one, the tail, to the device. With no device block
        free at all, a complete device tail from earlier steps that no other sequence shares moves to
        the host (one block copy) and its device block becomes the new tail.
        """
        device = self.device
        num_device = min(num_blocks, device.num_free) if self.pooling else num_blocks
        num_host = num_blocks - num_device
        if num_host == 0:
            block_table.extend(device.allocate(num_blocks))
            return
        host = self.host
        if num_device == 0 and self._can_demote_tail(block_table, num_computed_tokens):
            device_tail = block_table[-1]
            [host_id] = host.allocate(1)
            self._add_swap_out(device_tail, host_id)
            if device.is_cached(device_tail):
                self._move_cached(device_tail, host_id)
            block_table[-1] = host_id
            block_table.extend(host.allocate(num_host - 1))
            block_table.append(device_tail)
            return
        block_table.extend(host.allocate(num_host))
        block_table.extend(device.allocate(num_device))

    def promote_tail(self, block_table: array) -> bool:
        """Move a sequence's host tail into a free device block. False if its tail is on the device,
        shared, or no device block is free."""
        tail = block_table[-1] if block_table else -1
        if tail < self.num_device_blocks or not self.device.num_free or self.host.ref_count(tail) > 1:
            return False
        [device_id] = self.device.allocate(1)
        self._swap_in.append((tail, device_id))
        if self.host.is_cached(tail):
            self._move_cached(tail, device_id)
        block_table[-1] = device_id
        return True

    def move_below_lease(self, block_table: array, index: int, donor_tables: Iterable[array]) -> bool:
        """Move host block ``block_table[index]``, which sits above the lease, to the device: into a
        free device block, or else into a full, non-tail, unshared device block of a sequence in
        ``donor_tables`` whose content moves to a free host block below the lease (the plan's swap_out
        empties it before its swap_in fills it). False when neither is possible.

        There is no host -> host copy; the donor's block is the bounce buffer for one. A host block
        that several sequences share moves once: the later ones follow the first one's copy."""
        host_id = block_table[index]
        if self.host.ref_count(host_id) > 1:
            moved_to = next((device_id for source, device_id in self._swap_in if source == host_id), None)
            if moved_to is not None:
                self.device.add_ref([moved_to])
                self.host.free([host_id])
                block_table[index] = moved_to
                return True
        if self.device.num_free:
            [device_id] = self.device.allocate(1)
        else:
            donor = self._find_donor(donor_tables) if self.host.num_free else None
            if donor is None:
                return False
            donor_table, donor_index = donor
            device_id = donor_table[donor_index]
            [donor_host_id] = self.host.allocate(1)
            self._add_swap_out(device_id, donor_host_id)
            if self.device.is_cached(device_id):
                self._move_cached(device_id, donor_host_id)
            donor_table[donor_index] = donor_host_id
        self._swap_in.append((host_id, device_id))
        if self.host.is_cached(host_id):
            self._move_cached(host_id, device_id)
        block_table[index] = device_id
        return True

    # ---------------------------------------------------------------- prefix cache

    def cache_block(self, block_id: int, block_hash: bytes, key: bytes) -> None:
        """Name a full, computed block of a sequence, unless another block holds that name already."""
        assert self.cache is not None
        if self.cache.insert(block_id, block_hash, key):
            self._tier(block_id).mark_cached(block_id)

    def cached_prefix(self, block_hashes: Sequence[bytes], keys: Iterable[bytes]) -> list[int]:
        """The cached blocks holding the first full blocks named ``block_hashes`` (built from ``keys``),
        up to the first miss. Without pooling, a cached host block is a hit only when it can be moved
        to the device (no reference), since running sequences hold device blocks only."""
        assert self.cache is not None
        lookup = self.cache.lookup
        block_ids = []
        for block_hash, key in zip(block_hashes, keys):
            block_id = lookup(block_hash, key)
            if block_id is None:
                break
            if not self.pooling and block_id >= self.num_device_blocks and self.host.ref_count(block_id):
                break
            block_ids.append(block_id)
        return block_ids

    def num_blocks_to_share(self, block_ids: Iterable[int]) -> int:
        """How many of ``num_free``'s blocks sharing these cached blocks takes: those nobody holds (they
        leave the free pools) and, without pooling, every host block (each needs a device block)."""
        first_host_id = self.num_device_blocks
        if self.pooling:
            return sum(not self.ref_count(block_id) for block_id in block_ids)
        return sum(block_id >= first_host_id or not self.device.ref_count(block_id) for block_id in block_ids)

    def share(self, block_table: array, block_ids: Sequence[int], num_device_blocks_needed: int) -> int:
        """Append cached blocks (from ``cached_prefix``) to an empty table, with a reference each.

        A device block is shared in place. A host block is promoted - copied into a device block,
        its name moving along - without pooling (running sequences hold device blocks only), and under
        pooling when nobody holds it and more device blocks are empty than the sequence and its step
        still need (``num_device_blocks_needed``): otherwise it is shared in place and streamed like any
        host block. Returns how many host blocks were hit."""
        device, host = self.device, self.host
        first_host_id = self.num_device_blocks
        # Every block is held before any is promoted: a promotion allocates a device block, which may
        # demote an evicted one into the host tier, which may evict a host block - never one of these.
        to_promote = []  # indices into the table
        for block_id in block_ids:
            if block_id < first_host_id:
                device.add_ref([block_id])
            else:
                if not self.pooling or not host.ref_count(block_id):
                    to_promote.append(len(block_table))
                host.add_ref([block_id])
            block_table.append(block_id)
        for index in to_promote:
            if self.pooling and device.num_empty <= num_device_blocks_needed:
                break
            host_id = block_table[index]
            [device_id] = device.allocate(1)
            # The reference taken above is the copy's now: take_copies drops it once the plan is made.
            self._swap_in.append((host_id, device_id))
            self._move_cached(host_id, device_id)
            block_table[index] = device_id
            assert self.cache is not None
            self.cache.stats.num_promotions += 1
        return sum(block_id >= first_host_id for block_id in block_ids)

    # ---------------------------------------------------------------- swapped sequences (kv_policy swap)

    def swap_out(self, block_table: array, num_computed_tokens: int) -> bool:
        """Copy a device-resident sequence's computed blocks to host blocks inside the lease and free
        its device blocks; its table then holds the host ids. False (nothing changed) when the lease
        has no room. A cached block that only this sequence holds moves with its name (and moves back
        with ``swap_in``); a shared one stays where it is, cached, and the sequence gets its own copy."""
        num_blocks = self.num_blocks_for(num_computed_tokens)
        if num_blocks == 0 or not self.host.can_allocate(num_blocks):
            return False
        if self._swap_in and not self._swap_in_destinations().isdisjoint(block_table[:num_blocks]):
            return False
        host_ids = self.host.allocate(num_blocks)
        device = self.device
        for device_id, host_id in zip(block_table[:num_blocks], host_ids):
            self._add_swap_out(device_id, host_id)
            if device.is_cached(device_id) and device.ref_count(device_id) == 1:
                self._move_cached(device_id, host_id)
        self.free(block_table)
        block_table.extend(host_ids)
        return True

    def swap_in(self, block_table: array) -> None:
        """Copy a swapped-out sequence's host blocks into new device blocks (the caller checked that
        the device has that many free)."""
        device_ids = self.device.allocate(len(block_table))
        self._swap_in.extend(zip(block_table, device_ids))
        for host_id, device_id in zip(block_table, device_ids):
            if self.host.is_cached(host_id):
                self._move_cached(host_id, device_id)
        del block_table[:]
        block_table.extend(device_ids)

    # ---------------------------------------------------------------- freeing and the plan

    def free(self, block_table: array) -> None:
        """Drop a sequence's references to its blocks, tail first (so that, of a cached sequence, the
        tail is evicted first and the prefix last), and empty the table."""
        if self._swap_out or self._swap_in:
            self._drop_copies_into({block_id for block_id in block_table if self.ref_count(block_id) == 1})
        if not self.host.num_used:
            self.device.free(reversed(block_table))
        else:
            first_host_id = self.num_device_blocks
            self.device.free([block_id for block_id in reversed(block_table) if block_id < first_host_id])
            self.host.free([block_id for block_id in reversed(block_table) if block_id >= first_host_id])
        del block_table[:]

    def take_copies(self) -> tuple[bytes, bytes]:
        """The gathered copies as a StepPlan's ``swap_out`` and ``swap_in`` (int32 (src, dst) pairs).
        The host blocks the swap_in reads are free from here on: a later plan that reuses them runs
        after this one."""
        swap_out = array("i", chain.from_iterable(self._swap_out)).tobytes() if self._swap_out else b""
        swap_in = b""
        if self._swap_in:
            swap_in = array("i", chain.from_iterable(self._swap_in)).tobytes()
            self.host.free([host_id for host_id, _ in self._swap_in])
        self._swap_out = []
        self._swap_out_sources = set()
        self._swap_in = []
        return swap_out, swap_in

    # ---------------------------------------------------------------- internals

    def _tier(self, block_id: int) -> BlockManager | HostBlockManager:
        return self.device if block_id < self.num_device_blocks else self.host

    def _move_cached(self, source_id: int, destination_id: int) -> None:
        """A copy moves a cached block's content: its name goes along (``destination_id`` is held)."""
        assert self.cache is not None
        self.cache.move(source_id, destination_id)
        self._tier(source_id).unmark_cached(source_id)
        self._tier(destination_id).mark_cached(destination_id)

    def _add_swap_out(self, device_id: int, host_id: int) -> None:
        self._swap_out.append((device_id, host_id))
        self._swap_out_sources.add(device_id)

    def _evict_device_block(self, device_id: int) -> None:
        """The device allocator hands out a free cached block: demote its content to a free host block
        inside the lease when there is one (and the block is not being copied out already), else
        forget it. Free counts do not change: the host block is free (cached) again at once.

        NOTE: the swap_out runs before anything of the plan writes the device block."""
        cache = self.cache
        assert cache is not None
        host = self.host
        if not host.num_free or device_id in self._swap_out_sources:
            cache.remove(device_id)
            return
        [host_id] = host.allocate(1)
        self._add_swap_out(device_id, host_id)
        cache.move(device_id, host_id)
        host.mark_cached(host_id)
        host.free([host_id])
        cache.stats.num_demotions += 1

    def _evict_host_block(self, host_id: int) -> None:
        """The host allocator reuses a free cached block, or the lease left it behind: forget its
        content, and drop a pending demotion into it (nobody will read that copy)."""
        assert self.cache is not None
        self.cache.remove(host_id)
        if self._swap_out and any(destination == host_id for _, destination in self._swap_out):
            self._swap_out = [pair for pair in self._swap_out if pair[1] != host_id]
            self._swap_out_sources = {source for source, _ in self._swap_out}

    def _can_demote_tail(self, block_table: array, num_computed_tokens: int) -> bool:
        """Whether the table's last block is a complete, unshared device block that may move to the
        host now (its device block is then written as the new tail)."""
        if not block_table or block_table[-1] >= self.num_device_blocks:
            return False
        if num_computed_tokens < len(block_table) * self.block_size:
            return False  # this step still writes into it
        tail = block_table[-1]
        if self.device.ref_count(tail) > 1 or tail in self._swap_out_sources:
            return False
        return not self._swap_in or tail not in self._swap_in_destinations()

    def _find_donor(self, tables: Iterable[array]) -> tuple[array, int] | None:
        """A full (non-tail), unshared device block of one of ``tables`` that no copy of this plan
        touches yet."""
        busy = self._swap_in_destinations() | self._swap_out_sources
        first_host_id = self.num_device_blocks
        ref_count = self.device.ref_count
        for table in tables:
            for index in range(len(table) - 1):
                block_id = table[index]
                if block_id < first_host_id and block_id not in busy and ref_count(block_id) == 1:
                    return table, index
        return None

    def _swap_in_destinations(self) -> set[int]:
        return {device_id for _, device_id in self._swap_in}

    def _drop_copies_into(self, dead_block_ids: set[int]) -> None:
        """Forget the pending copies into blocks losing their last reference. A swap_in into a cached
        device block is undone: the name goes back to the host block it would have read, which holds
        the content still. A host block such a swap_in would have read is then released (its
        reference was the copy's). A swap_out into a cached host block still runs: it fills the
        cache."""
        kept_swap_in = []
        for host_id, device_id in self._swap_in:
            if device_id not in dead_block_ids:
                kept_swap_in.append((host_id, device_id))
                continue
            if self.device.is_cached(device_id):
                self._move_cached(device_id, host_id)
            else:
                dead_block_ids.add(host_id)
            self.host.free([host_id])
        self._swap_in = kept_swap_in
        host = self.host
        kept_swap_out = [
            pair for pair in self._swap_out if pair[1] not in dead_block_ids or host.is_cached(pair[1])
        ]
        if len(kept_swap_out) != len(self._swap_out):
            self._swap_out = kept_swap_out
            self._swap_out_sources = {source for source, _ in kept_swap_out}
