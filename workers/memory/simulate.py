"""A synthetic plant for the expansion controller: closed-loop tests and tuning without a model.

It models what the executor and scheduler do to the controller's inputs (DESIGN.md "KV memory"):
a step of ``num_layers`` layers, each computing for ``layer_compute_base`` plus a cost per resident
block (attention reads more KV as the batch grows), while the copy engine streams the step's host
blocks layer by layer through a ring of ``prefetch_depth + 1`` staging slots over a link of
``bandwidth`` bytes/s. A layer whose copy is late waits: that is the stall. The scheduler side
holds ``min(demand, lease)`` host blocks, fills a grown lease at ``fill_rate`` blocks per step and
gives back blocks above a shrunk lease only after ``preempt_lag`` steps (preempting as it does).

A workload that changes is a list of :class:`Phase` s: from a given step the compute time scales
(many short requests -> few long-context ones: another batch, another step time) and the link
bandwidth scales (another tenant on the host link), both relative to the plant's own settings, so a
later phase at scale 1 is the recovery.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.memory.controller import DemandSample, ExpansionController, StepSample


@dataclass(frozen=True)
class Phase:
    """From step ``at_step`` on: compute times scale by ``compute_scale`` and the link bandwidth by
    ``bandwidth_scale`` (relative to the plant's settings, not to the previous phase)."""

    at_step: int
    compute_scale: float = 1.0
    bandwidth_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.at_step < 0 or self.compute_scale <= 0 or self.bandwidth_scale <= 0:
            raise ValueError("a phase starts at a step >= 0 and scales by positive factors.")


@dataclass
class Plant:
    """Executor + scheduler as the controller sees them; defaults are Llama-8B-like on a fast link."""

    num_layers: int = 32
    page_bytes: int = 64 << 10  # one block of one layer (16 tokens, 8 KV heads x 128, fp16)
    bandwidth: float = 50e9  # host -> device, bytes/s
    layer_compute_base: float = 3e-4  # seconds per layer with an empty cache
    layer_compute_per_block: float = 2e-8  # seconds per layer per resident block
    num_device_blocks: int = 4000  # device blocks in use under demand
    overhead: float = 2e-3  # non-forward time per step (schedule, sample, messages)
    prefetch_depth: int = 1
    prefetch_next_step: bool = True  # False: the first layers' loads are not hidden under the previous step
    noise: float = 0.0  # each step's compute, copy and overhead times scale by U(1 - noise, 1 + noise)
    # Measurement noise with a busy CPU's heavy tail: with this probability a step *reports* its
    # compute time and (independently) its copy time ``outlier_scale`` times longer than it was (the
    # thread that timed it waited for a core); what stalled is unchanged.
    outlier_rate: float = 0.0
    outlier_scale: float = 4.0
    report_copy_time: bool = False  # whether the executor measures its copy engine's busy time
    report_link_bandwidth: bool = False  # whether each step carries the executor's copy benchmark
    demand: Callable[[int], int] = lambda step: 1 << 30  # host blocks the workload wants at a step
    fill_rate: int = 1 << 30  # host blocks the scheduler can newly fill per step
    preempt_lag: int = 0  # steps before blocks above a lower lease are given back
    phases: tuple[Phase, ...] = ()  # workload and link changes, in any order
    seed: int = 0
    step_index: int = field(default=0, init=False)
    in_use: int = field(default=0, init=False)  # host blocks the scheduler holds
    _over_lease_steps: int = field(default=0, init=False)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def host_block_bytes(self) -> int:
        return self.num_layers * self.page_bytes

    def phase(self, step: int | None = None) -> Phase:
        """The phase in force at ``step`` (default: the next step to run)."""
        step = self.step_index if step is None else step
        started = [phase for phase in self.phases if phase.at_step <= step]
        return max(started, key=lambda phase: phase.at_step, default=Phase(0))

    def link_bandwidth(self, step: int | None = None) -> float:
        return self.bandwidth * self.phase(step).bandwidth_scale

    def layer_compute_time(self, blocks: int, step: int | None = None) -> float:
        """Noise-free compute time of one layer with ``blocks`` host blocks resident."""
        per_layer = self.layer_compute_base + self.layer_compute_per_block * (self.num_device_blocks + blocks)
        return per_layer * self.phase(step).compute_scale

    def transparent_limit(self, step: int | None = None) -> float:
        """Host blocks per step whose copy time equals the compute time (noise-free) at ``step``:
        the fixed point of ``M * page_bytes / bandwidth = base + per_block * (device + M)`` per layer."""
        blocks_per_second = self.link_bandwidth(step) / self.page_bytes
        scale = self.phase(step).compute_scale
        per_block = blocks_per_second * self.layer_compute_per_block * scale
        if per_block >= 1:
            return float("inf")  # compute grows faster than copies: never copy-bound
        return blocks_per_second * self.layer_compute_time(0, step) / (1 - per_block)

    def stall_limit(self, stall_target: float, step: int | None = None) -> float:
        """Host blocks per step whose (noise-free) stall fraction is ``stall_target`` at ``step``,
        by bisection."""
        low, high = 0.0, float(1 << 20)
        for _ in range(60):
            middle = (low + high) / 2
            blocks = round(middle)
            copy = blocks * self.page_bytes / self.link_bandwidth(step)
            forward, stall = self._pipeline(self.layer_compute_time(blocks, step), copy)
            fraction = stall / (forward + self.overhead)
            low, high = (middle, high) if fraction <= stall_target else (low, middle)
        return low

    def _jitter(self) -> float:
        return 1.0 + self.noise * (2 * self._rng.random() - 1) if self.noise else 1.0

    def _delay(self) -> float:
        if self.outlier_rate and self._rng.random() < self.outlier_rate:
            return self.outlier_scale
        return 1.0

    def step(self, lease: int) -> tuple[StepSample, DemandSample]:
        """Run one step under ``lease``; return what the executor and the scheduler would report."""
        wanted = max(0, self.demand(self.step_index))
        self.step_index += 1
        preemptions = 0
        if self.in_use > lease:
            self._over_lease_steps += 1
            if self._over_lease_steps > self.preempt_lag:
                preemptions = 1
                self.in_use = lease
        else:
            self._over_lease_steps = 0
        if self.in_use <= lease:
            self.in_use = min(wanted, lease, self.in_use + self.fill_rate)
        blocks = self.in_use
        compute = self.layer_compute_time(blocks, self.step_index - 1) * self._jitter()
        bandwidth = self.link_bandwidth(self.step_index - 1)
        copy = blocks * self.page_bytes / bandwidth * self._jitter()
        forward, stall = self._pipeline(compute, copy if blocks else 0.0)
        sample = StepSample(
            step_time=forward + self.overhead * self._jitter(),
            forward_time=forward,
            stall_time=stall,
            num_host_blocks=blocks,
            bytes_to_device=blocks * self.host_block_bytes,
            num_layers=self.num_layers,
            layer_compute_time=compute * self._delay(),
            copy_time=copy * self.num_layers * self._delay() if self.report_copy_time and blocks else 0.0,
            link_bandwidth=self.bandwidth if self.report_link_bandwidth else 0.0,  # measured at start
        )
        demand = DemandSample(
            num_waiting=1 if wanted > self.in_use else 0,
            num_preemptions=preemptions,
            num_host_blocks_in_use=self.in_use,
            short_of_blocks=wanted > self.in_use,
        )
        return sample, demand

    def _pipeline(self, compute: float, copy: float) -> tuple[float, float]:
        """(forward time, stall time) of one step. The first ``prefetch_depth`` layers were
        prefetched during the previous step; layer ``l``'s copy starts when the copy engine is
        free and its staging slot is (layer ``l - depth - 1`` finished computing)."""
        ring = self.prefetch_depth + 1
        prefetched = self.prefetch_depth if self.prefetch_next_step else 0
        compute_end: list[float] = []
        copy_free = now = stall = 0.0
        for layer in range(self.num_layers):
            ready = 0.0
            if copy and layer >= prefetched:
                slot_free = compute_end[layer - ring] if layer >= ring else 0.0
                copy_free = max(copy_free, slot_free) + copy
                ready = copy_free
            if ready > now:
                stall += ready - now
                now = ready
            now += compute
            compute_end.append(now)
        return now, stall


@dataclass
class Trace:
    """What a closed-loop run saw: per step, the lease in force and the plant's report."""

    leases: list[int] = field(default_factory=list)
    samples: list[StepSample] = field(default_factory=list)
    decisions: list[int] = field(default_factory=list)  # lease after each decision
    reasons: list[str] = field(default_factory=list)  # and why

    def stall_fraction(self, last_steps: int) -> float:
        return self.stall_fraction_between(len(self.samples) - last_steps, len(self.samples))

    def stall_fraction_between(self, start: int, end: int) -> float:
        """Stalled share of the simulated time of steps ``[start, end)`` (the plant's clock)."""
        samples = self.samples[max(0, start) : end]
        total = sum(sample.step_time for sample in samples)
        return sum(sample.stall_time for sample in samples) / total if total else 0.0


def run(controller: ExpansionController, plant: Plant, num_steps: int, trace: Trace | None = None) -> Trace:
    """Drive ``controller`` against ``plant`` for ``num_steps`` steps (appending to ``trace``)."""
    trace = trace or Trace()
    for _ in range(num_steps):
        lease = controller.lease
        sample, demand = plant.step(lease)
        trace.leases.append(lease)
        trace.samples.append(sample)
        decision = controller.observe(sample, demand)
        if decision is not None:
            trace.decisions.append(decision.lease)
            trace.reasons.append(decision.reason)
    return trace
