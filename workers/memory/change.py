"""Change detection for the expansion controller: has the workload's step time or the link changed?

The controller pools windows of evidence at one lease before it moves, which rides out noise but
lags a real change (many short requests -> few long-context ones; another tenant taking most of
the host link) by several windows. :class:`ChangeDetector` watches the two quantities the modelled
limit ``bandwidth * compute_time`` is made of, step by step, against their recent distribution
(the reference): ``steps`` host-reading steps in a row beyond its spread, the same way, are a
change. "Beyond" is past the reference's 10th or 90th percentile by a further ``threshold``
(relative), so the bar follows the noise: on a quiet plant a 1.5x change stands out, while on a
busy CPU, whose step times range over 10x, runs of fast or slow steps are part of the spread. A
run that breaks was noise and joins the reference, widening it.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

COMPUTE_TIME = "compute time"
LINK_BANDWIDTH = "link bandwidth"


@dataclass(frozen=True, slots=True)
class Change:
    """``quantity``: :data:`COMPUTE_TIME` or :data:`LINK_BANDWIDTH`; ``ratio``: its mean over the
    run divided by the reference's median (2.0: twice the compute time, 0.25: a quarter of the
    bandwidth)."""

    quantity: str
    ratio: float


class _Watch:
    """One quantity: its reference and the current run of steps beyond it."""

    def __init__(self, quantity: str, reference_steps: int) -> None:
        self.quantity = quantity
        self.reference: deque[float] = deque(maxlen=reference_steps)
        self.run: list[float] = []
        self.direction = 0

    def add(self, value: float | None, threshold: float, min_reference: int) -> None:
        """Count ``value``; None (not measured) neither extends nor breaks a run."""
        if value is None or value <= 0:
            return
        direction = 0
        if len(self.reference) >= min_reference:
            deciles = statistics.quantiles(self.reference, n=10, method="inclusive")
            low, high = deciles[0] / (1 + threshold), deciles[-1] * (1 + threshold)
            direction = 1 if value > high else -1 if value < low else 0
        if direction != self.direction:
            self.reference.extend(self.run)  # a run that broke was noise: part of the spread
            self.run = []
        self.direction = direction
        (self.run if direction else self.reference).append(value)

    def rebase(self) -> None:
        """The run was a change: it is the reference from now on."""
        self.reference.clear()
        self.reference.extend(self.run)
        self.run, self.direction = [], 0

    def clear(self) -> None:
        self.reference.clear()
        self.run, self.direction = [], 0


class ChangeDetector:
    """Detects a material change of the step's compute time or of the measured link bandwidth.

    ``reference_steps``: how many recent steps form the reference; ``min_reference``: how many it
    needs before steps are compared with it."""

    def __init__(
        self, threshold: float, steps: int, reference_steps: int = 64, min_reference: int = 8
    ) -> None:
        if threshold <= 0 or steps < 1 or not 2 <= min_reference <= reference_steps:
            raise ValueError(
                "a change needs a positive threshold, at least one step and 2 <= min_reference <= reference_steps."
            )
        self.threshold = threshold
        self.steps = steps
        self.min_reference = min_reference
        self._compute = _Watch(COMPUTE_TIME, reference_steps)
        self._bandwidth = _Watch(LINK_BANDWIDTH, reference_steps)

    def observe(self, compute_time: float | None, bandwidth: float | None) -> Change | None:
        """One host-reading step's compute time (seconds) and measured bandwidth (bytes/s; None:
        not measured); the change once ``steps`` of them in a row were beyond the reference the
        same way. The run becomes that quantity's reference."""
        self._compute.add(compute_time, self.threshold, self.min_reference)
        self._bandwidth.add(bandwidth, self.threshold, self.min_reference)
        for watch in (self._compute, self._bandwidth):
            if len(watch.run) >= self.steps:
                change = Change(
                    watch.quantity, statistics.fmean(watch.run) / statistics.median(watch.reference)
                )
                watch.rebase()
                return change
        return None

    @property
    def run_length(self) -> int:
        """Steps in the longest current run (0: the last steps were within the reference)."""
        return max(len(self._compute.run), len(self._bandwidth.run))

    def forget_compute_time(self) -> None:
        """The lease moved, and with it the batch: measure the compute time afresh. (The link's
        bandwidth does not depend on the lease; its reference stays.)"""
        self._compute.clear()
