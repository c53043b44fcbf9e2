"""Change detection for the expansion controller: has the workload's step time or the link changed?

The controller pools windows of evidence at one lease before it moves, which rides out noise but
lags a real change (many short requests -> few long-context ones; another tenant taking most of
the host link) by several windows. :class:`ChangeDetector` watches the two quantities the modelled
limit ``bandwidth * compute_time`` is made of, step by step, with a ratio test: the median of the
last ``steps`` host-reading steps against the median of the reference (the steps before them, up to
``reference_steps``, since the lease last moved: those the current plan was made from). Both in
logarithms, so a ratio is a distance and 4x down is as far as 4x up.

A change is a shift of the medians by more than ``threshold`` (relative) *and* by more than ``z``
standard errors of that difference, estimated robustly from the reference's spread (its median
absolute deviation), with all recent steps but one moved beyond ``threshold`` the same way. So the
bar follows the noise: on a quiet plant a 1.5x change stands out after ``steps`` steps, while on a
busy CPU, whose step times range over 10x, only a change well beyond that spread does. Medians, not
means, and not "every step in a row": one step that a busy CPU delayed can neither make a change
nor hide one. (The detector this replaced needed ``steps`` steps in a row beyond the spread: on the
synthetic plant with one step in ten mis-timed 4x it followed a compute-time change too late in 10 of 20
seeded cases, and on two recorded loaded runs it saw a 4x link cut 5 steps after it, this one 2-4.) A step
leaving the recent window joins the reference, so a slow drift moves the reference along with it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

COMPUTE_TIME = "compute time"
LINK_BANDWIDTH = "link bandwidth"

# Standard error of a median over n samples ~ MEDIAN_SE * sigma / sqrt(n) (normal data), and sigma
# ~ MAD_SIGMA * the median absolute deviation.
MEDIAN_SE = math.sqrt(math.pi / 2)
MAD_SIGMA = 1.4826


@dataclass(frozen=True, slots=True)
class Change:
    """``quantity``: :data:`COMPUTE_TIME` or :data:`LINK_BANDWIDTH`; ``ratio``: the new level over
    the reference's median (2.0: twice the compute time, 0.25: a quarter of the bandwidth), the new
    level measured on the last ``num_steps`` steps: from the first recent step that moved (the
    steps before it in the recent window were the old plant's)."""

    quantity: str
    ratio: float
    num_steps: int = 0  # the last steps that measured the new level (those that moved)


def beyond(values: Iterable[float], center: float, bar: float, direction: float) -> list[bool]:
    """Per value (logarithms): whether it is more than ``bar`` from ``center`` on the side of
    ``direction`` (its sign). A change is all of them but one."""
    return [(value - center) * direction > 0 and abs(value - center) > bar for value in values]


class _Watch:
    """One quantity, in logarithms: the reference and the recent steps tested against it."""

    def __init__(self, quantity: str, steps: int, reference_steps: int) -> None:
        self.quantity = quantity
        self.reference: deque[float] = deque(maxlen=reference_steps)
        self.recent: deque[float] = deque(maxlen=steps)

    def add(self, value: float | None) -> None:
        """Count ``value``; None (not measured) is no step of this quantity."""
        if value is None or not value > 0 or math.isinf(value):
            return
        if len(self.recent) == self.recent.maxlen:
            self.reference.append(self.recent[0])  # aged out of the test: part of the reference
        self.recent.append(math.log(value))

    def shift(self, threshold: float, z: float, min_reference: int) -> tuple[float, int] | None:
        """(log(new level / reference median), steps at the new level) when the recent steps are a
        change, else None."""
        if len(self.reference) < min_reference or len(self.recent) < (self.recent.maxlen or 0):
            return None
        center = statistics.median(self.reference)
        shift = statistics.median(self.recent) - center
        sigma = MAD_SIGMA * statistics.median(abs(value - center) for value in self.reference)
        error = MEDIAN_SE * sigma * math.sqrt(1 / len(self.recent) + 1 / len(self.reference))
        bar = math.log1p(threshold)
        if abs(shift) <= max(bar, z * error):
            return None
        # And all recent steps but one beyond the threshold the same way: a median that a few
        # delayed steps carried (three of six, when one step in ten is delayed 4x) is no change.
        moved = beyond(self.recent, center, bar, shift)
        if sum(moved) < len(moved) - 1:
            return None
        # The change may have come after the window's first step: the new level is measured from
        # the first step that moved on (a window of old and new steps would understate it).
        num_steps = len(moved) - moved.index(True)
        return statistics.median(list(self.recent)[-num_steps:]) - center, num_steps

    def leaning(self, threshold: float) -> int:
        """The last recent steps in a row beyond the reference's median by more than ``threshold``,
        the same way (0: the last step was within it, or no reference yet)."""
        if not self.reference:
            return 0
        center = statistics.median(self.reference)
        bar = math.log1p(threshold)
        run = direction = 0
        for value in reversed(self.recent):
            side = 1 if value > center + bar else -1 if value < center - bar else 0
            if side == 0 or direction not in (0, side):
                break
            run, direction = run + 1, side
        return run

    def rebase(self, num_steps: int) -> None:
        """The last ``num_steps`` recent steps measured a change: they are the reference from now on."""
        self.reference.clear()
        self.reference.extend(list(self.recent)[-num_steps:])
        self.recent.clear()

    def clear(self) -> None:
        self.reference.clear()
        self.recent.clear()


class ChangeDetector:
    """Detects a material change of the step's compute time or of the measured link bandwidth.

    ``steps``: recent steps whose median is tested; ``reference_steps``: how many steps before them
    form the reference; ``min_reference``: how many it needs before a test; ``z``: standard errors
    of the medians' difference a change must exceed, beside ``threshold``."""

    def __init__(
        self,
        threshold: float,
        steps: int,
        reference_steps: int = 64,
        min_reference: int = 8,
        z: float = 3.0,
    ) -> None:
        if threshold <= 0 or steps < 1 or z < 0 or not 2 <= min_reference <= reference_steps:
            raise ValueError(
                "a change needs a positive threshold, at least one step, z >= 0 and "
                "2 <= min_reference <= reference_steps."
            )
        self.threshold = threshold
        self.steps = steps
        self.min_reference = min_reference
        self.z = z
        self._compute = _Watch(COMPUTE_TIME, steps, reference_steps)
        self._bandwidth = _Watch(LINK_BANDWIDTH, steps, reference_steps)

    def observe(self, compute_time: float | None, bandwidth: float | None) -> Change | None:
        """One host-reading step's compute time (seconds) and measured bandwidth (bytes/s; None:
        not measured); the change once the last ``steps`` of them moved away from the reference.
        Those steps become that quantity's reference."""
        self._compute.add(compute_time)
        self._bandwidth.add(bandwidth)
        for watch in (self._bandwidth, self._compute):  # the link first: it needs no re-measuring
            found = watch.shift(self.threshold, self.z, self.min_reference)
            if found is not None:
                shift, num_steps = found
                watch.rebase(num_steps)
                return Change(watch.quantity, math.exp(shift), num_steps)
        return None

    @property
    def run_length(self) -> int:
        """The longest run of last steps beyond a reference by more than the threshold (0: the last
        step was within both): a change may be on its way."""
        return max(self._compute.leaning(self.threshold), self._bandwidth.leaning(self.threshold))

    def forget(self) -> None:
        """The lease moved, and with it the batch: measure both afresh. The compute time follows
        the batch; so does the measured bandwidth, where each copy has a fixed cost (the CPU copy
        thread: 58 MB/s at 90 blocks a step, 40 at 15, 30 at 5 on a 62.5 MB/s throttle), and a
        reference carried over would read a shrink as a slower link and shrink again."""
        self._compute.clear()
        self._bandwidth.clear()
