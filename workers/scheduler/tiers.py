"""Where a sequence's KV blocks live (device or host tier) and the whole-block copies that move them.

The scheduler's block id space is ``[0, D)`` device blocks and ``[D, D + H_max)`` host blocks
(DESIGN.md "Block ids"). A sequence's block table may mix both; the executor streams the host ones.
Moving a block between tiers is a copy the next StepPlan carries: ``swap_out`` (device -> host) and
``swap_in`` (host -> device), run by the executor before the forward pass, swap_out first.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from itertools import chain

from workers.scheduler.block_manager import BlockManager, HostBlockManager


class BlockTiers:
    """The device and host block pools behind one id space, where a sequence's new blocks go, and
    the copies between tiers that the next plan must carry.

    With ``pooling`` (kv_policy pie) a running sequence may hold host blocks inside the lease: new
    blocks go to the device first; when it is short, full blocks go to the host and the sequence's
    tail (the block being appended to) stays on the device, so steady-state decode only reads host
    blocks. Without pooling, host blocks only hold swapped-out sequences (kv_policy swap).

    NOTE: the executor runs a plan's swap_out copies, then its swap_in copies, then the forward pass.
    Copies gathered for one plan stay correct under any later reuse of blocks because:
    - a device block freed by a swap_out may be reused at once: its content is read first (even
      as the destination of a swap_in of the same plan: a bounce between two host blocks);
    - a host block read by a swap_in stays allocated until the plan is made, so no swap_out of the
      same plan overwrites it before it is read;
    - a device block written by a swap_in is never the source of a swap_out in the same plan (that
      would copy its old content);
    - freeing a block drops the pending copies into it (its content is dead), so no two copies of
      one plan write the same block.
    """

    def __init__(self, num_device_blocks: int, num_host_blocks: int, block_size: int, pooling: bool) -> None:
        self.device = BlockManager(num_device_blocks, block_size)
        self.host = HostBlockManager(num_host_blocks, block_size, first_block_id=num_device_blocks)
        self.num_device_blocks = num_device_blocks
        self.block_size = block_size
        self.pooling = pooling
        self._swap_out: list[tuple[int, int]] = []  # (device id, host id), for the next plan
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

    # ---------------------------------------------------------------- running sequences

    def allocate(self, block_table: array, num_blocks: int, num_computed_tokens: int) -> None:
        """Append ``num_blocks`` new blocks to a running sequence's table; check ``can_allocate`` first.

        Device blocks first. Short of device blocks (pooling), the first new blocks - full once this
        step has run - go to the host and the last one, the tail, to the device. With no device block
        free at all, a complete device tail from earlier steps moves to the host (one block copy) and
        its device block becomes the new tail.
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
            self._swap_out.append((device_tail, host_id))
            block_table[-1] = host_id
            block_table.extend(host.allocate(num_host - 1))
            block_table.append(device_tail)
            return
        block_table.extend(host.allocate(num_host))
        block_table.extend(device.allocate(num_device))

    def promote_tail(self, block_table: array) -> bool:
        """Move a sequence's host tail into a free device block. False if its tail is on the device
        or no device block is free."""
        tail = block_table[-1] if block_table else -1
        if tail < self.num_device_blocks or not self.device.num_free:
            return False
        [device_id] = self.device.allocate(1)
        self._swap_in.append((tail, device_id))
        block_table[-1] = device_id
        return True

    def move_below_lease(self, block_table: array, index: int, donor_tables: Iterable[array]) -> bool:
        """Move host block ``block_table[index]``, which sits above the lease, to the device: into a
        free device block, or else into a full, non-tail device block of a sequence in
        ``donor_tables`` whose content moves to a free host block below the lease (the plan's swap_out
        empties it before its swap_in fills it). False when neither is possible.

        There is no host -> host copy; the donor's block is the bounce buffer for one."""
        host_id = block_table[index]
        if self.device.num_free:
            [device_id] = self.device.allocate(1)
        else:
            donor = self._find_donor(donor_tables) if self.host.num_free else None
            if donor is None:
                return False
            donor_table, donor_index = donor
            device_id = donor_table[donor_index]
            [donor_host_id] = self.host.allocate(1)
            self._swap_out.append((device_id, donor_host_id))
            donor_table[donor_index] = donor_host_id
        self._swap_in.append((host_id, device_id))
        block_table[index] = device_id
        return True

    # ---------------------------------------------------------------- swapped sequences (kv_policy swap)

    def swap_out(self, block_table: array, num_computed_tokens: int) -> bool:
        """Copy a device-resident sequence's computed blocks to host blocks inside the lease and free
        its device blocks; its table then holds the host ids. False (nothing changed) when the lease
        has no room."""
        num_blocks = self.num_blocks_for(num_computed_tokens)
        if num_blocks == 0 or not self.host.can_allocate(num_blocks):
            return False
        if self._swap_in and not self._swap_in_destinations().isdisjoint(block_table[:num_blocks]):
            return False
        host_ids = self.host.allocate(num_blocks)
        self._swap_out.extend(zip(block_table[:num_blocks], host_ids))
        self.free(block_table)
        block_table.extend(host_ids)
        return True

    def can_swap_in(self, num_blocks: int) -> bool:
        return self.device.can_allocate(num_blocks)

    def swap_in(self, block_table: array) -> None:
        """Copy a swapped-out sequence's host blocks into new device blocks; check ``can_swap_in``."""
        device_ids = self.device.allocate(len(block_table))
        self._swap_in.extend(zip(block_table, device_ids))
        del block_table[:]
        block_table.extend(device_ids)

    # ---------------------------------------------------------------- freeing and the plan

    def free(self, block_table: array) -> None:
        """Free a sequence's blocks, tail first (a future prefix cache then evicts tails first), and
        empty the table."""
        if self._swap_out or self._swap_in:
            self._drop_copies_into(set(block_table))
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
        self._swap_in = []
        return swap_out, swap_in

    # ---------------------------------------------------------------- internals

    def _can_demote_tail(self, block_table: array, num_computed_tokens: int) -> bool:
        """Whether the table's last block is a complete device block that may move to the host now."""
        if not block_table or block_table[-1] >= self.num_device_blocks:
            return False
        if num_computed_tokens < len(block_table) * self.block_size:
            return False  # this step still writes into it
        return not self._swap_in or block_table[-1] not in self._swap_in_destinations()

    def _find_donor(self, tables: Iterable[array]) -> tuple[array, int] | None:
        """A full (non-tail) device block of one of ``tables`` that no copy of this plan touches yet."""
        busy = self._swap_in_destinations() | {device_id for device_id, _ in self._swap_out}
        first_host_id = self.num_device_blocks
        for table in tables:
            for index in range(len(table) - 1):
                block_id = table[index]
                if block_id < first_host_id and block_id not in busy:
                    return table, index
        return None

    def _swap_in_destinations(self) -> set[int]:
        return {device_id for _, device_id in self._swap_in}

    def _drop_copies_into(self, dead_block_ids: set[int]) -> None:
        """Forget the pending copies whose destination is being freed. A host block such a swap_in
        would have read is then read by nobody: free it now (and any swap_out into it)."""
        kept_swap_in = []
        for host_id, device_id in self._swap_in:
            if device_id in dead_block_ids:
                dead_block_ids.add(host_id)
                self.host.free([host_id])
            else:
                kept_swap_in.append((host_id, device_id))
        self._swap_in = kept_swap_in
        self._swap_out = [pair for pair in self._swap_out if pair[1] not in dead_block_ids]
