"""Each tensor-parallel rank's own executor figures for ``/metrics`` (``proto.Stats.ranks``).

The scheduler waits only for rank 0's StepResult; every other rank reports its figures for a step
with a ``RankStep`` message that the scheduler folds in whenever it arrives (never waited for, so
the ranks gain no synchronization). Under tensor parallelism each rank streams its own slice of the
host blocks over its own link, so its bytes and stalls, and its step times, are its own: the
controller steers by the slowest rank (``workers.memory.rank_steps``), and an operator sees which.
"""

from __future__ import annotations

import proto


class RankTotals:
    """Running sums per rank; ``ranks`` is the list that ``Stats.ranks`` carries (empty for one rank)."""

    def __init__(self, num_ranks: int) -> None:
        if num_ranks < 1:
            raise ValueError(f"a tensor-parallel size must be at least 1, got {num_ranks}.")
        self.ranks = [proto.RankStats(rank) for rank in range(num_ranks)] if num_ranks > 1 else []

    def add_result(self, result: proto.StepResult) -> None:
        """Rank 0's figures, from the StepResult the step loop waited for."""
        if self.ranks:
            self._add(
                self.ranks[0],
                result.step_time,
                result.forward_time,
                result.stall_time,
                result.bytes_to_device,
                result.bytes_to_host,
                result.num_staging_blocks,
            )

    def add_rank_step(self, step: proto.RankStep) -> None:
        """Another rank's figures for one step."""
        if not 0 < step.rank < len(self.ranks):
            raise ValueError(f"RankStep from rank {step.rank}, but the ranks other than 0 are 1..{len(self.ranks) - 1}.")
        self._add(
            self.ranks[step.rank],
            step.step_time,
            step.forward_time,
            step.stall_time,
            step.bytes_to_device,
            step.bytes_to_host,
            step.num_staging_blocks,
        )

    @staticmethod
    def _add(
        totals: proto.RankStats,
        step_time: float,
        forward_time: float,
        stall_time: float,
        bytes_to_device: int,
        bytes_to_host: int,
        num_staging_blocks: int,
    ) -> None:
        totals.num_steps += 1
        totals.step_seconds_total += step_time
        totals.forward_seconds_total += forward_time
        totals.stall_seconds_total += stall_time
        totals.bytes_to_device_total += bytes_to_device
        totals.bytes_to_host_total += bytes_to_host
        totals.num_staging_blocks = num_staging_blocks
