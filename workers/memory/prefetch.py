"""The prefetch the memory manager commands: the staging ring's width and the prefetch depth
(DESIGN.md "Streaming", "Device cost of expansion").

A ring of ``R = depth + 1`` areas of ``M`` pages costs ``R * M`` device pages. Sized for the largest
lease (the plan's capacity), most of it is device memory that can never be streamed into
transparently: a step can only hide ``bandwidth * compute_time`` bytes under its compute, and it
only reads the blocks its requests hold. So the ring is sized from the controller's measurements:

    transparent = max(bandwidth * compute_time / block_bytes, controller target)
    M = headroom * min(lease, transparent)

(the controller's target carries its calibration gain; the lease it decided is what demand needs;
``headroom`` leaves it room to grow before the ring must widen), at most the plan's capacity. The
depth is how many layers one layer's load takes at that lease, ``ceil(load / layer compute)``, at
least ``--prefetch-depth``. The lease is then capped at ``M`` (a step reads every host block its
running requests hold, so a lease above the ring could not be served); a decided lease at or above
the ring widens it at the next decision. The per-step loads stay derived from the plan by the
executor; only the ring's shape is commanded, between steps.

:class:`PrefetchPlanner` accumulates the step compute times between decisions and re-commands
only on a real change (hysteresis), so the ring is not reallocated every window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.memory.controller import StepSample

HEADROOM = 1.5  # ring over the modelled transparent blocks: room for the controller to probe
RESIZE_HYSTERESIS = 1.25  # resize only when the new ring is this much wider or narrower (a resize copies the pool)


@dataclass(frozen=True)
class PrefetchPlan:
    """``depth`` layers loaded ahead of compute; ``num_staging_blocks`` (M) host blocks per step."""

    depth: int
    num_staging_blocks: int

    def num_areas(self, num_layers: int) -> int:
        return min(self.depth + 1, num_layers)


def plan_prefetch(
    bandwidth: float,
    compute_time: float,
    num_layers: int,
    block_bytes: float,
    capacity: int,
    *,
    target_blocks: int = 0,
    lease_blocks: int | None = None,
    min_depth: int = 1,
    headroom: float = HEADROOM,
) -> PrefetchPlan:
    """The ring for a link of ``bandwidth`` bytes/s and steps of ``compute_time`` seconds of compute
    over ``num_layers`` layers, host blocks of ``block_bytes`` (all layers), at most ``capacity``
    blocks (the plan's ring). ``target_blocks``: the controller's estimate of the transparent lease;
    ``lease_blocks``: the lease it decided (None: size for the transparent limit itself)."""
    if bandwidth <= 0 or compute_time <= 0 or block_bytes <= 0:
        raise ValueError(
            f"bandwidth, compute_time and block_bytes must be positive, got {bandwidth}, {compute_time}, {block_bytes}."
        )
    if num_layers < 1 or capacity < 1 or min_depth < 1 or headroom < 1:
        raise ValueError("num_layers, capacity and min_depth must be at least 1, and headroom at least 1.")
    transparent = max(bandwidth * compute_time / block_bytes, target_blocks)
    steered = transparent if lease_blocks is None else min(max(1, lease_blocks), transparent)
    blocks = min(capacity, max(1, math.ceil(headroom * steered)))
    # At that lease, one layer's pages take this many layers' compute to load.
    load_seconds = max(1.0, min(blocks, steered)) * (block_bytes / num_layers) / bandwidth
    layer_seconds = compute_time / num_layers
    depth = min(max(min_depth, math.ceil(load_seconds / layer_seconds - 1e-9)), max(1, num_layers - 1))
    return PrefetchPlan(depth, blocks)


class PrefetchPlanner:
    """Decides when to command a new ring: after each controller decision, from the mean compute
    time of the steps since the last one. ``capacity``: the plan's ring (the budget reserved it);
    the executor starts with ``PrefetchPlan(min_depth, capacity)``."""

    def __init__(self, num_layers: int, block_bytes: float, capacity: int, min_depth: int = 1) -> None:
        self.num_layers = num_layers
        self.block_bytes = block_bytes
        self.capacity = capacity
        self.min_depth = min_depth
        self.current = PrefetchPlan(min_depth, capacity)
        self._compute_time = 0.0
        self._num_steps = 0

    def observe(self, step: StepSample) -> None:
        if step.compute_time > 0:
            self._compute_time += step.compute_time
            self._num_steps += 1

    def decide(self, bandwidth: float | None, target_blocks: int, lease: int) -> PrefetchPlan | None:
        """The new plan for the controller's decided ``lease`` and ``target_blocks``, when it
        differs enough from the current one (None: keep it). The memory manager caps the lease it
        grants at the ring."""
        if not bandwidth or not self._num_steps:
            return None
        compute_time = self._compute_time / self._num_steps
        self._compute_time, self._num_steps = 0.0, 0
        plan = plan_prefetch(
            bandwidth,
            compute_time,
            self.num_layers,
            self.block_bytes,
            self.capacity,
            target_blocks=target_blocks,
            lease_blocks=lease,
            min_depth=self.min_depth,
        )
        current = self.current
        # A resize reallocates the ring: only for a real change, or when the lease the controller
        # steers to no longer fits (it is capped at the ring, so a full ring is what holds it back).
        needed = lease >= current.num_staging_blocks
        grow = plan.num_staging_blocks > current.num_staging_blocks and (
            needed or plan.num_staging_blocks >= current.num_staging_blocks * RESIZE_HYSTERESIS
        )
        shrink = plan.num_staging_blocks * RESIZE_HYSTERESIS <= current.num_staging_blocks
        if not grow and not shrink:
            plan = PrefetchPlan(plan.depth, current.num_staging_blocks)
        if plan == current:
            return None
        self.current = plan
        return plan
