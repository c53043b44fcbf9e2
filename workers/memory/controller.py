"""Adaptive expansion: how many host blocks the scheduler may hold (DESIGN.md "Adaptive expansion").

The memory manager feeds :class:`ExpansionController` one :class:`StepSample` per executor step and
the scheduler's :class:`DemandSample`; every ``decide_every`` samples (``first_window`` while demand
meets an empty lease) the controller closes a window and returns a :class:`Decision`: the lease
``H`` (``0 <= H <= max_host_blocks``) to grant. Through worker processes the step spans arrive in
batches a step or more late, so the first grant does not wait for them: the scheduler's demand
report carries the last step's time and the executor's link benchmark, and the memory manager feeds
them as a prior sample the moment demand meets an empty lease (``HostMemory.on_demand``).

The physical limit it steers toward (DESIGN.md "Device cost of expansion"): each step streams every
host block it reads, all layers, host -> device, overlapped with compute. Expansion is transparent
while those bytes fit under the step's compute time::

    M * block_bytes + written <= bandwidth * compute_time  =>  H_limit ~ (bandwidth * compute_time - written) / block_bytes

(``written``: the step's write-backs, on the same copy engine.) Bandwidth comes from the executor's
copy time where it measures it, else from stalled windows (copy-bound, the copy engine was busy for
compute + stall), else from a prior: the executor's copy benchmark at start (carried by every step)
or one given to the constructor.

The model reads medians over a window's steps (compute time, and bandwidth where copy time is
measured), not means: on a busy CPU a step whose timer waited for a core reports several times its
real time, and a few such steps would move a mean, and every jump with it.

Control law. Windows at the same lease are pooled (ratio of sums); ``f`` is their stall fraction
(stall time / step time, over steps that read host blocks), ``M`` the host blocks a step read:

- ``f`` above ``stall_target * (1 + deadband)`` by more than ``evidence_z`` standard errors:
  **shrink** proportionally, to ``M * (compute + s*) / (compute + stall)`` — the blocks that would
  have stalled exactly the target ``s*`` (copy time scales with ``M``) — or, from the second shrink
  in a row, lower where the secant through both shrinks' (blocks, stall ratio) says so (stalls that
  fall more slowly than a copy-bound step's). That measurement also calibrates the model:
  ``gain = stall limit / H_limit``, and the lease that stalled becomes a ceiling for later jumps.
- ``f`` below ``stall_target * (1 - deadband)`` by as much, demand in most of the window, and the
  lease actually filled: **grow**. When ``gain * H_limit`` is ``far`` above the lease, jump from
  below: ``jump`` of the way there (``blind_jump`` of it before any step read host blocks, and
  from the median compute time of the last ``decide_every`` steps, those before demand included:
  the steps since demand began are a burst's first, prefill-heavy, 200 ms where the decode steps
  after take 30 on the CPU), as an overshoot costs preemptions when the stalls
  take it back and stopping short costs one window; never past the ceiling. Near the limit probe
  up by a small fraction that doubles while grows keep finding room and halves on every reversal
  (bisection), passing the ceiling only by the smallest probe. With no bandwidth known yet, grow
  geometrically until the first stalls measure it.
- **Starved**: a whole window of demand without a step (the scheduler idles with requests waiting:
  a long context needs more host blocks than the lease has left, however "unfilled" it looks)
  grows geometrically whatever the stalls said, and no shrink goes below that lease until nothing
  waits and no step reads host blocks: a lease that stalls beats one that serves nothing.
- No demand for ``release_after`` windows and a lease well above the blocks in use: **release**
  down to the peak usage plus headroom, never below the highest block in use (that would move
  blocks, or preempt, for nothing), so host memory goes back when the engine idles.
- Noise: a small move needs ``confirm_windows`` windows at the lease, a reversal twice that;
  stalls above ``strong_factor * stall_target`` in one window shrink at once, and ``strong_steps``
  steps in a row that each stalled that much close their window early (a cut link is acted on in
  a few steps, not a window).
- **Landing**: a shrink lands over a few steps, as the scheduler moves the blocks above the lease
  to the device (copies on the link the streamed blocks need) or preempts and recomputes. Until
  the blocks in use are within the lease, and for ``landing_steps`` steps after, a step's stalls
  measure that traffic, not the new lease: they are no evidence (the change detector still sees
  the steps). Counted, they had shrunk the lease again, 42 -> 10 blocks where 40 hide, and the
  pooled stalls held it there for 100 steps.
- **Change**: when the median compute time, or link bandwidth (from the executor's copy time), of
  the last ``change_steps`` host-reading steps is off the median of the steps before them (those
  the current plan was made from) by more than ``change_threshold`` and more than their noise, with
  all those steps but one moved the same way (:mod:`workers.memory.change`), the workload or the
  link changed (short requests -> long contexts, another tenant on the link). That is checked on
  every step, not per window, and not from the stalls (which, between the band's top and the
  "act at once" level, wait for a pool of evidence). The evidence windows, the ceiling and the
  secant were measured on the old plant: they are forgotten, a measured bandwidth replaces the
  estimate instead of being smoothed into it, and the lease is re-planned from the model on the
  steps that moved alone — at once down to the modelled limit when the steps read more than it;
  up ``jump`` of the way to it under demand only once ``change_steps`` more steps show the change
  too (all but one). Bad news is acted on at once, good news is confirmed: a few prefill-heavy
  steps after admissions (3x the decode steps' compute time on the CPU) would otherwise jump the
  lease far past what the steady steps hide, and the stalls that take it back cost more than the
  wait (measured: 40 -> 70 blocks and 12-15% stalls, or 45 -> 102 and up to 38%). ``gain`` is kept (it describes the pipeline, not the
  load), as it was before the change began: a window that closed during it measured both plants.
  Both are measured afresh after every move (the move itself changes the batch, and on the CPU
  copy thread the bandwidth with it), so the controller's own moves are not mistaken for a change.
  Without a measured copy time a faster link is invisible (nothing stalls); probes find it.
- With the evidence pool full (``evidence_windows``), a stall fraction above the band shrinks even
  within its noise: more windows would not narrow the margin, and the band's top is the promise.

NOTE: a shrink is only a lower lease; the scheduler migrates or preempts blocks above it over the
following steps. The controller never assumes that happened: it reads the blocks in use from every
:class:`DemandSample`, computes a shrink from the blocks a step actually read (not from the lease,
so a shrink that has not landed yet is not compounded), and holds while usage is above the lease.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import proto
from workers.memory.change import COMPUTE_TIME, Change, ChangeDetector, beyond


@dataclass(frozen=True, slots=True)
class StepSample:
    """Timings of one executor step (seconds) and what it streamed from host.

    ``layer_compute_time`` is the mean per-layer compute time (excluding stalls); with
    ``num_layers`` it gives the step's compute time, otherwise ``forward_time - stall_time`` does.
    ``copy_time`` is how long the copy engine was busy with the step's ``bytes_to_device +
    bytes_to_host``, where the executor measures it (0: not measured); it gives the link bandwidth
    directly, without waiting for stalls to reveal it. ``link_bandwidth`` is the executor's copy
    benchmark at start (bytes/s, 0: none): the prior until steps measure the link.
    """

    step_time: float
    forward_time: float = 0.0
    stall_time: float = 0.0
    num_host_blocks: int = 0
    bytes_to_device: int = 0
    num_layers: int = 0
    layer_compute_time: float = 0.0
    copy_time: float = 0.0
    bytes_to_host: int = 0
    link_bandwidth: float = 0.0

    @classmethod
    def from_result(cls, result: proto.StepResult, num_layers: int) -> StepSample:
        return cls(
            step_time=result.step_time,
            forward_time=result.forward_time,
            stall_time=result.stall_time,
            num_host_blocks=result.num_host_blocks,
            bytes_to_device=result.bytes_to_device,
            num_layers=num_layers,
            layer_compute_time=result.layer_compute_time,
            copy_time=result.copy_time,
            bytes_to_host=result.bytes_to_host,
            link_bandwidth=result.link_bandwidth,
        )

    @property
    def compute_time(self) -> float:
        if self.num_layers > 0 and self.layer_compute_time > 0:
            return self.num_layers * self.layer_compute_time
        return max(0.0, self.forward_time - self.stall_time)

    @property
    def measured_bandwidth(self) -> float | None:
        """Bytes/s over the copy engine's busy time, both directions (None: not measured)."""
        copied = max(0, self.bytes_to_device) + max(0, self.bytes_to_host)
        return copied / self.copy_time if self.copy_time > 0 and copied > 0 else None


@dataclass(frozen=True, slots=True)
class DemandSample:
    """The scheduler's view after its last schedule.

    ``num_waiting``: requests waiting for blocks; ``num_preemptions``: preemptions since the
    previous sample; ``num_host_blocks_in_use``: host blocks the scheduler holds now (may exceed
    the lease right after a shrink); ``short_of_blocks``: the last schedule wanted more blocks;
    ``high_water``: one past the highest host block index in use (0: not reported).
    """

    num_waiting: int = 0
    num_preemptions: int = 0
    num_host_blocks_in_use: int = 0
    short_of_blocks: bool = False
    high_water: int = 0

    @property
    def wants_blocks(self) -> bool:
        return self.num_waiting > 0 or self.num_preemptions > 0 or self.short_of_blocks


@dataclass(frozen=True, slots=True)
class Decision:
    """``lease``: host blocks the scheduler may hold; ``target``: the controller's estimate of the
    largest transparent lease (where it steers under demand); ``reason``: ``action[: detail]``,
    action one of grow, shrink, release, hold — for ``/metrics`` labels and logs."""

    lease: int
    target: int
    reason: str

    @property
    def action(self) -> str:
        return self.reason.partition(":")[0]


@dataclass(frozen=True)
class ControllerTuning:
    """Knobs of the control law; the defaults are what the closed-loop tests exercise."""

    decide_every: int = 8  # samples per decision window
    first_window: int = 1  # samples per window while the lease is 0 and every sample wants blocks
    deadband: float = 0.5  # hold while stalls are within target * (1 -/+ deadband)
    confirm_windows: int = 2  # windows at one lease before a small move (twice that to reverse)
    evidence_windows: int = 8  # windows pooled at one lease, at most
    evidence_z: float = 2.0  # leave the band only by this many standard errors of the stall fraction
    strong_factor: float = 4.0  # stalls above strong_factor * target shrink without confirmation
    strong_steps: int = 3  # this many host-reading steps in a row stalled that much close the window early
    growth_factor: float = 2.0  # geometric growth while no bandwidth is known
    blind_jump: float = 0.25  # share of the modelled limit a jump takes before any step read host blocks
    jump: float = 0.75  # share of the way from the lease to the modelled limit a jump takes
    far: float = 0.1  # a modelled limit this much above the lease is jumped to; nearer, probed
    secant_spread: float = 0.2  # a secant needs its two shrinks' blocks this far apart (relative)
    probe_min: float = 0.02  # smallest / largest fractional probe step above the model
    probe_max: float = 0.25
    min_shrink_factor: float = 0.25  # one shrink keeps at least this fraction of the lease
    fill_fraction: float = 0.9  # the lease counts as filled (binding) at this usage
    release_after: int = 3  # windows without demand before host memory is returned
    release_headroom: float = 0.25  # keep usage * (1 + headroom) when releasing
    release_slack: float = 0.1  # release only if it frees at least this fraction of the lease
    bandwidth_smoothing: float = 0.5  # EWMA weight of a new bandwidth measurement
    change_threshold: float = 0.3  # relative: the recent median compute time or bandwidth this far off,
    change_steps: int = 6  # over this many host-reading steps (all but one moved): the plant changed
    landing_steps: int = 2  # host-reading steps after a shrink landed that are not yet its evidence
    gain_min: float = 1 / 16
    gain_max: float = 4.0

    def __post_init__(self) -> None:
        counts = (
            self.decide_every,
            self.first_window,
            self.confirm_windows,
            self.release_after,
            self.change_steps,
            self.strong_steps,
            self.landing_steps + 1,
        )
        if min(counts) < 1:
            raise ValueError(
                "decide_every, first_window, confirm_windows, release_after, change_steps and strong_steps "
                "must be at least 1."
            )
        if self.change_threshold <= 0:
            raise ValueError(f"change_threshold must be positive, got {self.change_threshold}.")
        if self.evidence_windows < 2 * self.confirm_windows:
            raise ValueError("evidence_windows must hold a reversal's 2 * confirm_windows windows.")
        if not 0 <= self.deadband < 1:
            raise ValueError(f"deadband must be in [0, 1), got {self.deadband}.")
        if self.growth_factor <= 1 or not 0 < self.probe_min <= self.probe_max:
            raise ValueError("growth_factor must exceed 1 and 0 < probe_min <= probe_max.")
        if not 0 < self.min_shrink_factor < 1 or not 0 < self.fill_fraction <= 1:
            raise ValueError("min_shrink_factor must be in (0, 1) and fill_fraction in (0, 1].")
        if not 0 < self.blind_jump <= 1 or not 0 < self.jump <= 1:
            raise ValueError("blind_jump and jump must be in (0, 1].")
        if self.far < 0 or not 0 <= self.secant_spread < 1:
            raise ValueError("far must be non-negative and secant_spread in [0, 1).")
        if not 0 < self.bandwidth_smoothing <= 1 or not 0 < self.gain_min <= 1 <= self.gain_max:
            raise ValueError("bandwidth_smoothing must be in (0, 1] and gain_min <= 1 <= gain_max.")


@dataclass
class _Window:
    """Sums over the samples since the last decision. Ratios of sums, not means of ratios, so a
    single noisy step cannot dominate and empty windows never divide by zero."""

    num_samples: int = 0
    num_demand: int = 0
    num_preemptions: int = 0
    last_in_use: int = 0
    peak_in_use: int = 0
    high_water: int = 0  # the last sample's
    num_steps: int = 0
    compute_time: float = 0.0  # all steps
    step_time: float = 0.0
    num_host_steps: int = 0  # steps that read host blocks: the only ones that can stall
    host_blocks: int = 0
    host_bytes: int = 0
    host_write_bytes: int = 0  # written back to host on host-reading steps (the same copy engine)
    host_compute_time: float = 0.0
    host_stall_time: float = 0.0
    host_fraction_sum: float = 0.0  # per-step stall fractions, for their spread
    host_fraction_squares: float = 0.0
    host_step_time: float = 0.0
    num_landing: int = 0  # host-reading steps of a shrink still landing: counted, but no evidence
    # Per host-reading step, for medians: a step whose timer waited for a core (a busy CPU) reports
    # 4x its compute or copy time, and one in ten of those would move a mean by a third.
    host_compute_times: list[float] = field(default_factory=list)
    copy_rates: list[float] = field(default_factory=list)  # bytes/s, on steps that measured it
    copied_bytes: int = 0  # on steps that measured their copy time, both directions
    copy_time: float = 0.0
    link_bandwidth: float = 0.0  # the executor's measurement at start (summed over samples carrying it)
    num_link_samples: int = 0

    def add(self, step: StepSample | None, demand: DemandSample, evidence: bool = True) -> None:
        """One sample; ``evidence=False``: a step of a shrink still landing, whose stalls and blocks
        describe the migration and the old lease, not the new one (its time and copies still count)."""
        self.num_samples += 1
        self.num_demand += demand.wants_blocks
        self.num_preemptions += max(0, demand.num_preemptions)
        self.last_in_use = max(0, demand.num_host_blocks_in_use)
        self.high_water = max(0, demand.high_water)
        self.peak_in_use = max(self.peak_in_use, self.last_in_use)
        if step is None:
            return
        compute = max(0.0, step.compute_time)
        step_time = max(0.0, step.step_time)
        self.num_steps += 1
        if step.link_bandwidth > 0:
            self.link_bandwidth += step.link_bandwidth
            self.num_link_samples += 1
        self.compute_time += compute
        self.step_time += step_time
        if step.num_host_blocks > 0 and not evidence:
            self.num_landing += 1
        elif step.num_host_blocks > 0:
            self.num_host_steps += 1
            self.host_blocks += step.num_host_blocks
            self.host_bytes += max(0, step.bytes_to_device)
            self.host_write_bytes += max(0, step.bytes_to_host)
            self.host_compute_time += compute
            self.host_compute_times.append(compute)
            self.host_stall_time += max(0.0, step.stall_time)
            fraction = max(0.0, step.stall_time) / step_time if step_time > 0 else 0.0
            self.host_fraction_sum += fraction
            self.host_fraction_squares += fraction * fraction
            self.host_step_time += step_time
        copied = max(0, step.bytes_to_device) + max(0, step.bytes_to_host)
        if step.copy_time > 0 and copied > 0:
            self.copied_bytes += copied
            self.copy_time += step.copy_time
            self.copy_rates.append(copied / step.copy_time)

    @classmethod
    def pool(cls, windows: list[_Window]) -> _Window:
        """One window summing ``windows`` (oldest first): ratio-of-sums over all their steps."""
        pooled = cls()
        for window in windows:
            for name, value in vars(window).items():
                setattr(pooled, name, getattr(pooled, name) + value)
        pooled.last_in_use = windows[-1].last_in_use if windows else 0
        pooled.high_water = windows[-1].high_water if windows else 0
        pooled.peak_in_use = max((window.peak_in_use for window in windows), default=0)
        return pooled

    @property
    def stall_fraction(self) -> float:
        return self.host_stall_time / self.host_step_time if self.host_step_time > 0 else 0.0

    @property
    def stall_fraction_error(self) -> float:
        """Standard error of the stall fraction, from the spread of per-step fractions (0 with
        fewer than two steps: no spread to measure)."""
        n = self.num_host_steps
        if n < 2:
            return 0.0
        variance = (self.host_fraction_squares - self.host_fraction_sum**2 / n) / (n - 1)
        return math.sqrt(max(0.0, variance) / n)

    def per_step(self) -> tuple[float, float, float] | None:
        """Mean (compute, stall, step) time per step, over host-reading steps when there are any
        (the batch the limit is about), otherwise over all steps; None without steps."""
        if self.num_host_steps:
            n = self.num_host_steps
            return self.host_compute_time / n, self.host_stall_time / n, self.host_step_time / n
        if self.num_steps:
            n = self.num_steps
            return self.compute_time / n, 0.0, self.step_time / n
        return None


class ExpansionController:
    """Decides the host lease from measured stalls, bandwidth and demand (see the module doc).

    ``link_bandwidth`` (bytes/s, e.g. from a copy benchmark at start) and ``host_block_bytes``
    (``KVLayout.block_bytes``) are priors that let the first decision jump; both are replaced by
    measurements as soon as steps provide them.
    """

    def __init__(
        self,
        max_host_blocks: int,
        stall_target: float = 0.02,
        *,
        initial_lease: int = 0,
        link_bandwidth: float | None = None,
        host_block_bytes: int | None = None,
        tuning: ControllerTuning | None = None,
    ) -> None:
        if max_host_blocks < 0:
            raise ValueError(f"max_host_blocks must be non-negative, got {max_host_blocks}.")
        if not 0 < stall_target < 1:
            raise ValueError(f"stall_target must be a fraction in (0, 1), got {stall_target}.")
        self.max_host_blocks = max_host_blocks
        self.stall_target = stall_target
        self.tuning = tuning or ControllerTuning()
        self.probe_blocks = max(1, max_host_blocks // 64)  # first grow without a model
        lease = min(max(0, initial_lease), max_host_blocks)
        self._bandwidth = link_bandwidth if link_bandwidth and link_bandwidth > 0 else None
        self._bandwidth_measured = False  # False: _bandwidth is a prior (or None)
        self._block_bytes = float(host_block_bytes) if host_block_bytes and host_block_bytes > 0 else None
        self._gain = 1.0
        self._probe = self.tuning.probe_min  # grows as consecutive grows find more room
        self._direction = 0  # of the last feedback move: +1 grow, -1 shrink (release excluded)
        self._evidence: list[_Window] = []  # windows since the last move, newest last
        self._quiet_windows = 0
        self._stall_fraction = 0.0
        self._last_model: float | None = None  # uncorrected model limit of the last window with steps
        # (blocks per step, stall ratio) of the last shrink, for the next one's secant.
        self._shrink_point: tuple[float, float] | None = None
        self._ceiling: int | None = None  # the lowest lease that stalled since demand began
        # The lease a starved engine was grown to (see _starved): shrinks stop there until demand ends.
        self._floor = 0
        self._measured_host_steps = False  # whether any window had steps that read host blocks
        self._window = _Window()
        self._decision = Decision(lease, lease, "hold: start")
        # Watches each host-reading step; the samples of its current run are what a re-plan
        # measures the changed plant on.
        tuning = self.tuning
        self._detector = ChangeDetector(
            tuning.change_threshold,
            tuning.change_steps,
            reference_steps=tuning.evidence_windows * tuning.decide_every,
            min_reference=max(2, tuning.decide_every),
        )
        # Twice the detector's steps: a change that allows a larger lease is confirmed over as many
        # steps again before the re-plan (see _pending_growth), and measured on all of them.
        self._recent: deque[tuple[StepSample, DemandSample]] = deque(maxlen=2 * tuning.change_steps)
        # A change that allows a larger lease, awaiting confirmation: (the change, the old level of
        # its quantity, host-reading steps since it was detected).
        self._pending: tuple[Change, float, int] | None = None
        self._strong_run = 0  # host-reading steps in a row, to the last, stalled strong_factor over target
        self._landing = 0  # after a shrink: host-reading steps still to pass before evidence counts
        # The compute time of the last steps, host-reading or not: what a blind jump is sized from.
        self._compute_times: deque[float] = deque(maxlen=tuning.decide_every)
        self._gain_before_run = self._gain  # a window that closed during a run measured both plants

    # ------------------------------------------------------------------ inputs and outputs

    @property
    def lease(self) -> int:
        return self._decision.lease

    @property
    def decision(self) -> Decision:
        return self._decision

    @property
    def stall_fraction(self) -> float:
        """Stall fraction measured at the current lease (windows since the last change, pooled;
        host-reading steps only)."""
        return self._stall_fraction

    @property
    def bandwidth(self) -> float | None:
        """Estimated host -> device bandwidth in bytes/s (None until known)."""
        return self._bandwidth

    def observe(self, step: StepSample | None, demand: DemandSample) -> Decision | None:
        """Record one step (``None``: an idle tick with no step, so an idle engine still releases
        memory) and the scheduler's demand; every ``decide_every`` samples (``first_window`` while
        demand meets an empty lease), decide."""
        window = self._window
        if self.lease == 0 and demand.wants_blocks and window.num_demand < window.num_samples:
            # Demand against an empty lease: the idle samples before it say nothing about it.
            window = self._window = _Window()
        landing = False
        if step is not None and step.num_host_blocks > 0 and self._landing:
            # A shrink lands over a few steps: the scheduler moves the blocks above the lease to
            # the device (host -> device copies on the link the streamed blocks need) or preempts
            # and recomputes. Until it has, and for ``landing_steps`` steps after, the stalls
            # measure that traffic: taken as evidence they had shrunk the lease again, 42 -> 10
            # blocks where 40 hide (the throttled link), and held it there for 100 steps.
            landing = True
            if demand.num_host_blocks_in_use <= self.lease:
                self._landing -= 1
        window.add(step, demand, evidence=not landing)
        if step is not None:
            self._compute_times.append(max(0.0, step.compute_time))
        if step is not None and step.num_host_blocks > 0:
            if not landing:
                strong = step.stall_time > self.tuning.strong_factor * self.stall_target * step.step_time
                self._strong_run = self._strong_run + 1 if strong else 0
            # The change detector watches every step: a link cut while a shrink lands is still a cut.
            self._recent.append((step, demand))
            change = self._detector.observe(step.compute_time, step.measured_bandwidth)
            if change is not None and change.ratio > 1:
                # Good news (more compute to hide copies under, or a faster link) is confirmed over
                # more steps first; bad news is acted on at once.
                self._pending = (change, self._level(change.quantity, change.num_steps) / change.ratio, 0)
            elif change is not None:
                self._pending = None
                return self._replan(change)
            elif self._pending is not None:
                decision = self._pending_growth()
                if decision is not None:
                    return decision
            if self._detector.run_length == 0 and self._pending is None:
                self._gain_before_run = self._gain
        # A short first window, so the first jump (the bandwidth prior and a couple of steps'
        # compute time are enough) comes at once rather than after a window of preemptions.
        first = self.lease == 0 and window.num_demand == window.num_samples >= self.tuning.first_window
        # A run of steps each stalled far over the target (the link was cut under a full lease) is
        # acted on at once, not a window later: each step of it costs several times the target. One
        # such step is not enough (a busy CPU delays a copy now and then); a run of them is.
        stalling = self._strong_run >= self.tuning.strong_steps
        if first or stalling or window.num_samples >= self.tuning.decide_every:
            return self.decide()
        return None

    def decide(self) -> Decision:
        """Close the current window and decide the lease from it."""
        self._strong_run = 0
        window, self._window = self._window, _Window()
        lease = self.lease
        self._decision = self._next(window)
        if self.lease != lease:
            self._pending = None  # the move was made on newer evidence; it is measured afresh
        self._watch(lease)
        return self._decision

    def _values(self, quantity: str, num_steps: int) -> list[float]:
        """``quantity`` over the last ``num_steps`` host-reading steps, where they measured it."""
        values = [
            step.compute_time if quantity == COMPUTE_TIME else step.measured_bandwidth
            for step, _ in list(self._recent)[-max(1, num_steps) :]
        ]
        return [value for value in values if value]

    def _level(self, quantity: str, num_steps: int) -> float:
        """The median of ``quantity`` over the last ``num_steps`` host-reading steps."""
        values = self._values(quantity, num_steps)
        return statistics.median(values) if values else 0.0

    def _pending_growth(self) -> Decision | None:
        """A change that allows a larger lease (compute time up: a prefill burst, or longer
        contexts; the link faster) is re-planned only once ``change_steps`` more steps still show
        it: a transient (a few prefill-heavy steps after admissions, 3x the compute time of the
        decode steps around them) would jump the lease far past what the steady steps hide, and
        the stalls that take it back cost more than waiting. Shrinking on bad news is not delayed."""
        change, old_level, seen = self._pending
        seen += 1
        self._pending = (change, old_level, seen)
        if seen < self.tuning.change_steps:
            return None
        self._pending = None
        # As the detector tests a change: all the steps since but one beyond the threshold.
        logs = [math.log(value) for value in self._values(change.quantity, seen)]
        bar = math.log1p(self.tuning.change_threshold)
        moved = beyond(logs, math.log(old_level), bar, +1) if old_level > 0 else []
        if not moved or sum(moved) < len(moved) - 1:
            # It passed: the steps are back near the old level, which they measure afresh.
            self._detector.forget()
            self._decision = self._hold(f"{change.quantity} {change.ratio:.2g}x for a few steps only")
            return self._decision
        level = self._level(change.quantity, change.num_steps + seen)
        return self._replan(Change(change.quantity, level / old_level, change.num_steps + seen))

    def _watch(self, lease_before: int) -> None:
        """After a move the compute time and the bandwidth are measured afresh (the move changes the
        batch, and with it both: the first steps at the new lease are the reference, not a change).
        A window that closed during a run keeps watching: the run may be the change this window
        straddled."""
        if self.lease != lease_before and self._detector.run_length == 0:
            self._detector.forget()

    # ------------------------------------------------------------------ control law

    def _next(self, window: _Window) -> Decision:
        if window.num_samples == 0:
            return self._hold("no samples")
        self._learn(window)
        if window.num_landing and not window.num_host_steps:
            return self._hold("shrink pending")  # no evidence at the new lease yet
        tuning = self.tuning
        self._evidence = [*self._evidence[1 - tuning.evidence_windows :], window]
        pooled = _Window.pool(self._evidence)
        fraction = self._stall_fraction = pooled.stall_fraction
        # Leave the band only when the stall fraction is outside it by more than its noise.
        margin = tuning.evidence_z * pooled.stall_fraction_error
        self._quiet_windows = 0 if window.num_demand else self._quiet_windows + 1
        if self._quiet_windows >= tuning.release_after and not window.num_host_steps:
            # Nothing waits and no step reads host blocks: the requests that needed the floor are
            # done, and the next ones may need less.
            self._floor = 0
        if window.num_steps == 0 and window.num_demand == window.num_samples and self.lease < self.max_host_blocks:
            return self._starved()
        if window.stall_fraction > tuning.strong_factor * self.stall_target:
            return self._shrink(window, window.stall_fraction)  # far over: act on this window alone
        over = fraction > self.stall_target * (1 + tuning.deadband)
        # With the evidence pool full, more windows would not narrow the margin: a lease that stalls
        # above the band on all of them is too large, however noisy each step is.
        if over and (fraction - margin > self.stall_target * (1 + tuning.deadband) or self._evidence_full):
            return self._shrink(pooled, fraction)
        if self._quiet_windows >= tuning.release_after:
            return self._release(window)
        # Growth needs demand in most of the window: a lone waiting request is not a trend.
        if 2 * window.num_demand < window.num_samples and window.num_preemptions == 0:
            return self._hold("no demand")
        if fraction + margin >= self.stall_target * (1 - tuning.deadband):
            return self._hold(f"stalls {_percent(fraction)} near {_percent(self.stall_target)}")
        if window.last_in_use < math.floor(tuning.fill_fraction * self.lease):
            return self._hold("lease not full")  # more lease would not be used (or a grow is landing)
        if self.lease >= self.max_host_blocks:
            return self._hold("at max")
        return self._grow(pooled, fraction)

    def _replan(self, change: Change) -> Decision:
        """The plant changed (see the module doc): forget what was measured on the old one and move
        to the model's limit on the steps since the change."""
        window = _Window()
        # Only the steps that measured the new level: the recent ones before them were the old plant's.
        for step, demand in list(self._recent)[-max(1, change.num_steps) :]:
            window.add(step, demand)
        self._recent.clear()
        self._window = _Window()  # its earlier samples were the old plant's
        self._strong_run = 0  # and so were the stalled steps before the change
        # A decision on a window that straddled the change calibrated the gain on both plants.
        self._gain = self._gain_before_run
        self._learn(window, fresh=True)
        self._evidence = []
        self._shrink_point = None
        self._ceiling = None
        self._probe = self.tuning.probe_min
        self._direction = 0
        self._stall_fraction = window.stall_fraction
        lease = self.lease
        what = f"{change.quantity} {change.ratio:.2g}x, re-planned"
        model = self._model_limit(window)
        target = min(self._gain * model, self.max_host_blocks) if model is not None else None
        blocks = window.host_blocks / window.num_host_steps if window.num_host_steps else 0.0
        demand = 2 * window.num_demand >= window.num_samples or window.num_preemptions > 0
        filled = window.last_in_use >= math.floor(self.tuning.fill_fraction * lease)
        if target is not None and max(target, self._floor) < lease and blocks > target:
            # The steps read more than the new limit: they stall until the lease is there.
            decision = self._move(-1, max(0, math.floor(target), self._floor), f"shrink: {what}")
        elif target is not None and target >= lease * (1 + self.tuning.far) and demand and filled:
            # From below, as any jump: the rest follows in the next window.
            new = min(math.ceil(lease + self.tuning.jump * (target - lease)), self.max_host_blocks)
            decision = self._move(+1, max(new, lease + 1), f"grow: {what}")
        else:
            decision = self._hold(what)
        self._decision = decision
        self._watch(lease)
        return decision

    def _shrink(self, evidence: _Window, fraction: float) -> Decision:
        lease = self.lease
        limit = self._stall_limit(evidence)
        point = self._stall_point(evidence)
        # Only from a shrink that landed: while blocks above the lease are still held, the stalls
        # fall because fewer blocks are read so far, not because of where the lease is.
        secant = self._secant(point) if point is not None and evidence.last_in_use <= lease else None
        if secant is not None:
            limit = secant if limit is None else min(limit, secant)
        model = self._model_limit(evidence)
        if limit is not None and model:
            # Calibrate the model on what the stalls measured, so the next jump lands below them.
            self._gain = min(max(limit / model, self.tuning.gain_min), self.tuning.gain_max)
        # Stalls above target at this lease: later jumps stay below it until a probe shows room.
        self._ceiling = lease if self._ceiling is None else min(self._ceiling, lease)
        if self._floor >= lease:
            return self._hold("stalls, at the lease a starved engine needed")
        strong = fraction > self.tuning.strong_factor * self.stall_target
        if not strong and not self._enough_evidence(-1):
            return self._hold("confirming shrink")
        floor = max(math.floor(self.tuning.min_shrink_factor * lease), self._floor)
        new = lease - 1 if limit is None else min(lease - 1, max(math.floor(limit), floor))
        if new < 0 or (evidence.last_in_use > lease and (limit is None or limit >= lease)):
            # Blocks above the last lease are still held: that shrink has not landed yet and
            # these stalls come from them; shrinking again would compound it.
            return self._hold("shrink pending")
        decision = self._move(-1, new, f"shrink: stalls {_percent(fraction)} > {_percent(self.stall_target)}")
        self._shrink_point = point
        return decision

    def _stall_point(self, window: _Window) -> tuple[float, float] | None:
        """(host blocks per step, stall seconds per second of everything else) over the window's
        host-reading steps. The ratio, unlike the stall fraction, grows linearly with the blocks
        both when the link cannot keep up with compute and when only the first layers are exposed."""
        times = window.per_step()
        if not window.num_host_steps or times is None or times[2] <= times[1]:
            return None
        _, stall, step = times
        return window.host_blocks / window.num_host_steps, stall / (step - stall)

    def _secant(self, point: tuple[float, float]) -> float | None:
        """Blocks per step at the stall target, on the line through this shrink's evidence and the
        last one's, when the last shrink lowered the stalls but not enough. The model behind
        ``_stall_limit`` assumes a copy-bound step; stalls that fall more slowly than it predicts
        (first layers no prefetch hid, write-backs) make it shrink too little, and the secant
        measures the real slope instead."""
        if self._shrink_point is None:
            return None
        (last_blocks, last_ratio), (blocks, ratio) = self._shrink_point, point
        target = self.stall_target / (1 - self.stall_target)
        # Two points close together: their difference is mostly noise, and so would the slope be.
        if not (last_blocks * (1 - self.tuning.secant_spread) > blocks > 0 and last_ratio > ratio > target):
            return None
        secant = blocks - (ratio - target) * (last_blocks - blocks) / (last_ratio - ratio)
        # No host block, no stall: stalls at most proportional to the blocks bound it from below
        # (two close, noisy points could otherwise extrapolate to nothing).
        return max(secant, blocks * target / ratio)

    def _grow(self, evidence: _Window, fraction: float) -> Decision:
        lease = self.lease
        blind = not self._measured_host_steps
        # Blind (no step read host blocks yet), the window is the steps since demand began: the
        # first of a burst, prefill-heavy (200 ms where the decode steps after take 30, on the CPU
        # with the throttled link), so the median of the last steps, before demand too, stands in.
        compute = statistics.median(self._compute_times) if blind and self._compute_times else None
        model = self._model_limit(evidence, compute)
        target = self._gain * model if model else None
        if target is not None and blind:
            # Modelled from steps that read no host block (no write-backs, no stalls yet): go part
            # way, and let the next window, which reads host blocks, jump on.
            target *= self.tuning.blind_jump
        if target is not None and self._ceiling is not None:
            target = min(target, self._ceiling - 1)  # not back into stalls measured on this climb
        # Jump when the model (or the lack of one) says the limit is far; near it the model is
        # no more precise than the stalls, so probe in small steps. A small step or a turn after
        # shrinking needs consistent evidence.
        far = target is None or target >= lease * (1 + self.tuning.far)
        if (self._direction < 0 or not far) and not self._enough_evidence(+1):
            return self._hold("confirming grow")
        if target is None:
            # No bandwidth known yet: grow geometrically until stalls measure it.
            new = max(self.probe_blocks, math.ceil(lease * self.tuning.growth_factor))
        elif far:
            # Most of the way to the modelled limit: overshooting costs preemptions when the
            # stalls take it back, stopping short only a window until the next jump.
            share = self.tuning.jump if self._measured_host_steps else 1.0  # (a blind target is cut already)
            new = math.ceil(lease + share * (target - lease))
        else:
            # Stalls say there is room the model does not see (it measured a smaller batch):
            # probe above it and let the model follow, so a later jump starts from here.
            new = max(math.ceil(lease * (1 + self._probe)), lease + 1)
            if self._ceiling is not None:
                # Up to the lease that stalled, then past it by the smallest probe.
                smallest = max(math.ceil(lease * (1 + self.tuning.probe_min)), lease + 1)
                new = min(new, self._ceiling - 1) if lease < self._ceiling - 1 else smallest
            self._gain = min(max(self._gain, new / model), self.tuning.gain_max) if model else self._gain
        new = min(max(new, lease + 1), self.max_host_blocks)
        if self._ceiling is not None and new >= self._ceiling:
            self._ceiling = None  # a probe tries it again: the limit may have moved up
        reason = f"grow: demand, stalls {_percent(fraction)} < {_percent(self.stall_target)}"
        return self._move(+1, new, reason, probing=not far)

    def _starved(self) -> Decision:
        """A whole window of demand without a step: the scheduler is idle with requests waiting,
        so nothing can run in this lease (a long context needs more host blocks than it has left).
        Stalls are better than no step at all: grow geometrically, whatever the stalls measured
        before, and do not shrink below the lease that let the engine run again until demand ends
        (shrinking back would preempt the request and starve it again)."""
        lease = self.lease
        new = min(max(self.probe_blocks, math.ceil(lease * self.tuning.growth_factor)), self.max_host_blocks)
        self._floor = new
        self._ceiling = None  # stalls measured at a smaller lease do not bound a starved engine's
        self._evidence = []
        self._direction = +1
        self._landing = 0  # a grow: no shrink is landing now, the next steps are evidence
        return Decision(new, self._target(), "grow: starved, requests wait and no step runs")

    def _release(self, window: _Window) -> Decision:
        lease = self.lease
        keep = min(lease, math.ceil(window.peak_in_use * (1 + self.tuning.release_headroom)))
        # Never below a block in use: a release would move blocks, or preempt, for nothing.
        keep = max(keep, min(lease, window.high_water))
        # Hysteresis in size as well as in time: a release must free a real share of the lease.
        if lease - keep < max(1, math.ceil(self.tuning.release_slack * lease)):
            return self._hold("no demand")
        # Demand that returns later is a new climb, not a reversal of the last feedback move.
        self._evidence = []
        self._shrink_point = None
        self._ceiling = None
        self._probe = self.tuning.probe_min
        self._direction = 0
        return Decision(keep, self._target(), "release: no demand")

    @property
    def _evidence_full(self) -> bool:
        return len(self._evidence) >= self.tuning.evidence_windows

    def _enough_evidence(self, direction: int) -> bool:
        """A small move needs ``confirm_windows`` windows at this lease, a reversal twice that:
        one noisy window must neither nudge the lease nor turn it around."""
        needed = self.tuning.confirm_windows * (1 if self._direction in (0, direction) else 2)
        return len(self._evidence) >= needed

    def _move(self, direction: int, new: int, reason: str, probing: bool = False) -> Decision:
        tuning = self.tuning
        if self._direction not in (0, direction):
            self._probe = max(tuning.probe_min, self._probe / 2)  # bisect around the limit
        elif probing:
            self._probe = min(tuning.probe_max, self._probe * 2)  # the limit keeps moving up: speed up
        else:
            self._probe = tuning.probe_min  # a jump lands on the model: probe finely from there
        self._direction = direction
        if direction > 0:
            self._shrink_point = None  # a grow ends a series of shrinks
        self._landing = tuning.landing_steps if direction < 0 else 0
        self._evidence = []  # what was measured at the old lease says nothing about the new one
        return Decision(new, self._target(), reason)

    def _hold(self, why: str) -> Decision:
        return Decision(self.lease, self._target(), f"hold: {why}")

    # ------------------------------------------------------------------ model

    def _learn(self, window: _Window, fresh: bool = False) -> None:
        """Update bytes per block and bandwidth from the window's measurements (``fresh``: after a
        change, a measured bandwidth replaces the estimate instead of being smoothed into it)."""
        self._measured_host_steps = self._measured_host_steps or window.num_host_steps > 0
        if window.host_blocks > 0 and window.host_bytes > 0:
            self._block_bytes = window.host_bytes / window.host_blocks
        if self._bandwidth is None and window.num_link_samples:
            self._bandwidth = window.link_bandwidth / window.num_link_samples  # the prior, until measured
        measured = None
        if window.copy_time > 0:
            measured = statistics.median(window.copy_rates)  # robust to a step's delayed timer
        elif window.stall_fraction > self.stall_target * (1 + self.tuning.deadband):
            # Copy-bound: the copy engine was busy for the compute time plus the stalls.
            times = window.per_step()
            if times is not None and times[0] + times[1] > 0 and window.host_bytes > 0:
                measured = window.host_bytes / window.num_host_steps / (times[0] + times[1])
        if measured:
            weight = self.tuning.bandwidth_smoothing
            self._bandwidth = (
                weight * measured + (1 - weight) * self._bandwidth
                if self._bandwidth_measured and self._bandwidth and not fresh
                else measured  # the first measurement replaces the prior
            )
            self._bandwidth_measured = True
        model = self._model_limit(window)
        if model is not None:
            self._last_model = model

    def _target_stall(self, stall: float, step: float) -> float:
        """Stall seconds per step that make ``stall_target`` of a step with the same other time."""
        return self.stall_target * max(0.0, step - stall) / (1 - self.stall_target)

    def _model_limit(self, window: _Window, compute_time: float | None = None) -> float | None:
        """(bandwidth * (compute + target stall) - bytes written back) / block bytes: the blocks
        one copy engine can load per step beside the step's write-backs; uncorrected, None when
        unknown. ``compute_time``: the step's, where the caller knows better than the window."""
        times = window.per_step()
        if self._bandwidth is None or not self._block_bytes or times is None:
            return None
        compute, stall, step = times
        if compute_time is not None:
            compute = compute_time
        elif window.host_compute_times:
            compute = statistics.median(window.host_compute_times)  # robust to a step's delayed timer
        written = window.host_write_bytes / window.num_host_steps if window.num_host_steps else 0.0
        budget = self._bandwidth * (compute + self._target_stall(stall, step)) - written
        return max(0.0, budget) / self._block_bytes

    def _stall_limit(self, window: _Window) -> float | None:
        """Blocks per step that would have stalled exactly the target, from this window's stalls."""
        times = window.per_step()
        if times is None or not window.num_host_steps:
            return None
        compute, stall, step = times
        if compute + stall <= 0:
            return None
        blocks = window.host_blocks / window.num_host_steps
        return blocks * (compute + self._target_stall(stall, step)) / (compute + stall)

    def _target(self) -> int:
        if self._last_model is None:
            return self.lease
        return min(self.max_host_blocks, max(0, round(self._gain * self._last_model)))


def _percent(fraction: float) -> str:
    """0.003 -> '0.3%', 0.02 -> '2%', 0.513 -> '51.3%'."""
    return f"{100 * fraction:.1f}".rstrip("0").rstrip(".") + "%"
