"""One step sample per step from N tensor-parallel ranks: the slowest rank's (DESIGN.md "Parallelism").

Each executor rank sends its own ``step`` span (labelled ``pied.step.rank``); every rank streams its
own slice of the host blocks over its own link, so the step is as transparent as its slowest rank.
The controller gets one sample per step: once every rank's has arrived, the one with the most stall
(then the longest step).
"""

from __future__ import annotations

from workers.memory.controller import StepSample

MAX_OPEN_STEPS = 64  # steps still missing a rank's span (a span lost to a dying rank is never completed)


class SlowestRank:
    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self._open: dict[int, list[StepSample]] = {}

    def add(self, step_id: int, sample: StepSample) -> StepSample | None:
        """Record one rank's sample of ``step_id``; returns the step's slowest sample once all are in."""
        if self.num_ranks == 1:
            return sample
        samples = self._open.setdefault(step_id, [])
        samples.append(sample)
        if len(samples) < self.num_ranks:
            while len(self._open) > MAX_OPEN_STEPS:
                del self._open[min(self._open)]
            return None
        del self._open[step_id]
        return max(samples, key=lambda s: (s.stall_time, s.step_time))
