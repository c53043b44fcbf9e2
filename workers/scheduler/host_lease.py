"""The host lease on the scheduler's side: granting a new lease, settling the host blocks a shrunken
lease left above it, and the last step whose plan may still touch host memory above it.

The memory manager may unmap host memory above a shrunken lease once no block above it is in use
and the result of step ``release_step_id`` is back: plans made until then may still read or write it.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.scheduler.request import Request
from workers.scheduler.request_queue import RequestQueue
from workers.scheduler.tiers import BlockTiers


class HostLeaseKeeper:
    """Keeps the scheduler's host blocks inside the lease. ``settle`` preempts through the
    scheduler's own ``preempt`` and ``recompute``, so the queues keep one owner."""

    def __init__(self, tiers: BlockTiers) -> None:
        self.tiers = tiers
        self.release_step_id = -1

    def set(self, num_blocks: int, last_step_id: int) -> None:
        """Grant host block ids ``[D, D + num_blocks)``; ``last_step_id`` is the last plan made."""
        if num_blocks < self.tiers.host.lease:
            self.release_step_id = last_step_id
        self.tiers.host.set_lease(num_blocks)

    def note_plan(self, step_id: int) -> None:
        """Plan ``step_id`` is being made, before the host blocks its swap_in reads are freed."""
        if self.tiers.host.num_used_above_lease:
            # Still held only as the sources of this plan's swap_in (freed just after).
            self.release_step_id = step_id

    def settle(
        self,
        running: list[Request],
        swapped: RequestQueue,
        preempt: Callable[[Request], None],
        recompute: Callable[[Request], None],
    ) -> None:
        """The lease shrank below host blocks in use: swapped requests holding such blocks recompute;
        running ones move them to the device (migration) or, when that is impossible, the most
        recently admitted running requests are preempted. Nothing is dropped."""
        tiers = self.tiers
        above_lease = [
            request
            for request in swapped
            if any(tiers.is_above_lease(block_id) for block_id in request.block_table)
        ]
        for request in reversed(above_lease):  # keep their order at the head of the waiting queue
            swapped.remove(request)
            recompute(request)
        index = 0
        while index < len(running):
            if self._move_below_lease(running[index], running, preempt):
                index += 1

    def _move_below_lease(
        self, request: Request, running: list[Request], preempt: Callable[[Request], None]
    ) -> bool:
        """Move a running request's host blocks above the lease to the device, preempting from the
        end of the batch while that is impossible. False if ``request`` itself was preempted."""
        tiers = self.tiers
        table = request.block_table
        for index in range(len(table)):
            if not tiers.is_above_lease(table[index]):
                continue
            while not tiers.move_below_lease(table, index, (other.block_table for other in running)):
                victim = running.pop()
                preempt(victim)
                if victim is request:
                    return False
        return True
