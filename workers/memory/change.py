"""Change detection for the expansion controller: has the workload's step time or the link changed?

The controller pools windows of evidence at one lease before it moves, which rides out noise but
lags a real change (many short requests -> few long-context ones; another tenant taking most of
the host link) by several windows. :class:`ChangeDetector` watches the two quantities the modelled
limit ``bandwidth * compute_time`` is made of, step by step, against a reference measured at the
current lease: ``steps`` host-reading steps in a row off the reference by more than ``threshold``
(relative, either way), in the same direction, are a change. A single slow step (a GC pause, a
prefill chunk) breaks a run instead of starting a change; noise within the threshold starts none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Change:
    """``quantity``: ``"compute time"`` or ``"link bandwidth"``; ``ratio``: its mean over the run
    divided by the reference (2.0: twice the compute time, 0.25: a quarter of the bandwidth)."""

    quantity: str
    ratio: float


class _Run:
    """Consecutive deviations of one quantity from its reference, one way."""

    def __init__(self, quantity: str) -> None:
        self.quantity = quantity
        self.reference: float | None = None
        self.direction = 0
        self.length = 0
        self.total = 0.0  # of the run's ratios to the reference

    def add(self, value: float | None, threshold: float) -> None:
        """Count ``value``; None (not measured) or no reference: the run neither grows nor breaks."""
        if value is None or self.reference is None:
            return
        ratio = value / self.reference
        direction = 1 if ratio > 1 + threshold else -1 if ratio < 1 / (1 + threshold) else 0
        if direction != self.direction:
            self.length, self.total = 0, 0.0
        self.direction = direction
        if direction:
            self.length += 1
            self.total += ratio

    def clear(self, reference: float | None) -> None:
        self.reference = reference if reference is not None and reference > 0 else None
        self.direction, self.length, self.total = 0, 0, 0.0


class ChangeDetector:
    """Detects a material change of the step's compute time or of the measured link bandwidth."""

    def __init__(self, threshold: float, steps: int) -> None:
        if threshold <= 0 or steps < 1:
            raise ValueError("a change needs a positive threshold and at least one step.")
        self.threshold = threshold
        self.steps = steps
        self._runs = (_Run("compute time"), _Run("link bandwidth"))

    def reset(self, compute_time: float | None, bandwidth: float | None) -> None:
        """Compare from now on with ``compute_time`` (seconds per step) and ``bandwidth`` (bytes/s);
        None: do not watch that quantity (not measured at this lease yet)."""
        compute, link = self._runs
        compute.clear(compute_time)
        link.clear(bandwidth)

    def observe(self, compute_time: float | None, bandwidth: float | None) -> Change | None:
        """One host-reading step's compute time and measured bandwidth (None: not measured); the
        change once ``steps`` of them in a row deviated the same way. The detector then watches
        nothing until the next :meth:`reset`: its references are stale."""
        compute, link = self._runs
        compute.add(compute_time, self.threshold)
        link.add(bandwidth, self.threshold)
        for run in self._runs:
            if run.length >= self.steps:
                change = Change(run.quantity, run.total / run.length)
                self.reset(None, None)
                return change
        return None

    @property
    def run_length(self) -> int:
        """Host-reading steps in the longest current run (0: the last step deviated in nothing)."""
        return max(run.length for run in self._runs)
