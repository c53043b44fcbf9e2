"""How long the executor's next forward pass may take before the engine counts as hung.

Heartbeats come from the actors' event loops, so a forward pass that never returns (a CUDA or copy
deadlock on the compute thread) leaves every heartbeat fresh. The executor's loop watches each step
on its compute thread against this deadline, timed from the step's own start; past it the executor
fails, and with it the engine (``workers.executor.actor``).

With ``--step-timeout`` the deadline is that, for every step (the first ones included). Without it,
the deadline follows the measured step times: ``max(floor, factor x the slowest of the last
window steps)``, and the first ``num_warmup_steps`` steps get ``warmup_seconds`` (kernels compile on
their first use). A slow but healthy engine raises its own deadline as it goes.
"""

from __future__ import annotations

import math
from collections import deque

FLOOR_SECONDS = 60.0
FACTOR = 10.0
WINDOW = 64
WARMUP_STEPS = 16
WARMUP_SECONDS = 600.0


class StepDeadline:
    """``seconds()`` for the next step; ``record(elapsed)`` once it has returned."""

    def __init__(
        self,
        fixed: float | None = None,
        *,
        floor: float = FLOOR_SECONDS,
        factor: float = FACTOR,
        window: int = WINDOW,
        num_warmup_steps: int = WARMUP_STEPS,
        warmup_seconds: float = WARMUP_SECONDS,
    ) -> None:
        if fixed is not None and not (math.isfinite(fixed) and fixed > 0):
            raise ValueError(f"a fixed step deadline must be a positive number of seconds, got {fixed}.")
        if not (floor > 0 and factor >= 1 and window >= 1 and num_warmup_steps >= 0):
            raise ValueError("step deadline: floor > 0, factor >= 1, window >= 1, num_warmup_steps >= 0.")
        self.fixed = fixed
        self.floor = floor
        self.factor = factor
        self.num_warmup_steps = num_warmup_steps
        self.warmup_seconds = max(warmup_seconds, floor)
        self.num_steps = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._slowest = 0.0  # of _recent; recomputed only when the slowest leaves the window

    def seconds(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if self.num_steps < self.num_warmup_steps:
            return self.warmup_seconds
        return max(self.floor, self.factor * self._slowest)

    def record(self, elapsed: float) -> None:
        recent = self._recent
        leaving = recent[0] if len(recent) == recent.maxlen else None
        recent.append(elapsed)
        self.num_steps += 1
        if elapsed >= self._slowest:
            self._slowest = elapsed
        elif leaving is not None and leaving >= self._slowest:
            self._slowest = max(recent)
