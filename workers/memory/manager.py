"""The memory manager: owns host memory — segments, the lease, and (later) the expansion controller.

Host memory grows and shrinks in whole segments of ``blocks_per_segment`` host blocks; segment ``i``
backs host indices ``[i * S, (i + 1) * S)``. The lease (how many host blocks the scheduler may hold)
is always backed by segments; segments above it are released when the lease shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import proto
from proto.config import EngineConfig, parse_expansion
from proto.plan import HostPlan
from workers.memory.host_pool import HostSegment, KVLayout
from workers.plan import plan_of

if TYPE_CHECKING:
    from workers.memory.controller import DemandSample, StepSample


class MemoryManager:
    """Creates and releases host segments so that exactly the lease is backed."""

    def __init__(self, plan: HostPlan, layout: KVLayout) -> None:
        self.plan = plan
        self.layout = layout
        self.segments: dict[int, HostSegment] = {}
        self.lease = 0

    @property
    def blocks_per_segment(self) -> int:
        return self.plan.blocks_per_segment

    def set_lease(self, num_blocks: int) -> tuple[list[proto.HostSegmentInfo], list[int]]:
        """Back exactly ``num_blocks`` host blocks (rounded up to whole segments).

        Returns (segments created, to attach; segment ids released, to detach). NOTE: release only
        after the scheduler holds no block above the new lease.
        """
        num_blocks = max(0, min(num_blocks, self.plan.max_host_blocks))
        size = self.plan.blocks_per_segment
        needed = -(-num_blocks // size)
        created = []
        for segment_id in range(needed):
            if segment_id not in self.segments:
                first = segment_id * size
                count = min(size, self.plan.max_host_blocks - first)
                segment = HostSegment.create(segment_id, first, count, self.layout)
                self.segments[segment_id] = segment
                created.append(segment.info)
        released = sorted(segment_id for segment_id in self.segments if segment_id >= needed)
        for segment_id in released:
            self.segments.pop(segment_id).close()
        self.lease = num_blocks
        return created, released

    def close(self) -> None:
        self.set_lease(0)


@dataclass
class LeaseChange:
    """One change of the host lease, in the order it must be applied:

    1. the executor maps ``attach`` (before any plan uses their blocks);
    2. the scheduler gets ``lease``;
    3. ``detach`` is unmapped only once the scheduler holds no block above the lease, as a report
       written after it applied the last lease sent says (``HostMemory.release_ready``).
    """

    lease: int
    attach: list[proto.HostSegmentInfo]
    # A new staging ring (adaptive pie), sent before the lease when it widens (so the lease always
    # fits the ring the scheduler knows) and after it when it narrows.
    prefetch: proto.PrefetchCommand | None = None
    ring_first: bool = False


class HostMemory:
    """The memory manager's policy: the lease for ``kv_policy`` and ``expansion``, the segments
    backing it, and (adaptive) the controller steering it from the executor's step results."""

    def __init__(self, config: EngineConfig, layout: KVLayout | None = None) -> None:
        """``layout``: the KV layout of the plan (default: built from it)."""
        from workers.memory.controller import DemandSample, ExpansionController, StepSample
        from workers.memory.prefetch import PrefetchPlanner

        self._demand_sample = DemandSample
        self._step_sample = StepSample
        self.config = config
        self.layout = layout or kv_layout_for(config)
        # The host plan as the daemon checked it (memory available): not derived again.
        self.plan = plan_of(config).host
        if self.plan.max_host_blocks and self.plan.block_bytes != self.layout.block_bytes:
            raise ValueError(
                f"the host plan's blocks are {self.plan.block_bytes} bytes, the KV layout's {self.layout.block_bytes}."
            )
        self.manager = MemoryManager(self.plan, self.layout)
        self.adaptive = config.kv_policy == "pie" and parse_expansion(config.expansion) is None
        self.controller = (
            ExpansionController(
                self.plan.max_host_blocks, config.stall_target, host_block_bytes=self.layout.block_bytes
            )
            if self.adaptive
            else None
        )
        # The staging ring follows the controller's measurements (adaptive only: fixed:N needs a
        # ring of N); it starts as the plan's, the largest lease, which the budget reserved.
        self.prefetch = (
            PrefetchPlanner(
                self.layout.num_layers,
                self.layout.block_bytes,
                self.plan.num_staging_blocks,
                min_depth=config.prefetch_depth,
            )
            if self.adaptive and self.plan.num_staging_blocks
            else None
        )
        self.decision_reason = "fixed" if not self.adaptive else "start"
        self.target = self.plan.initial_lease if not self.adaptive else 0
        self._last_preemptions = 0
        self.granted = 0  # the lease last granted to the scheduler
        self.lease_id = 0  # the number of the last HostLease sent (proto.HostLease.lease_id)

    @property
    def max_host_blocks(self) -> int:
        return self.plan.max_host_blocks

    @property
    def num_staging_blocks(self) -> int:
        """The staging ring's width, host blocks per step (pie only): the plan's (the largest
        lease) until the memory manager commands another."""
        if self.prefetch is not None:
            return self.prefetch.current.num_staging_blocks
        return self.plan.num_staging_blocks

    @property
    def lease(self) -> int:
        return self.manager.lease

    @property
    def link_bandwidth(self) -> float:
        """The controller's host -> device bandwidth estimate, bytes/s (0: unknown or no controller)."""
        return (self.controller.bandwidth or 0.0) if self.controller is not None else 0.0

    def start(self) -> LeaseChange:
        """The first lease: fixed:N and swap grant everything now; adaptive starts empty and grows."""
        lease = 0 if self.adaptive else self.plan.initial_lease
        created, _ = self.manager.set_lease(lease)
        self.granted = lease
        return LeaseChange(lease, created)

    def on_demand(self, demand: proto.DemandReport) -> LeaseChange | None:
        """The scheduler's report, the moment it arrives: when its demand meets an empty lease, the
        first grant is sized now from the last step's time and the executor's link benchmark that
        the report carries. Step spans reach the manager in batches, a step or more after the step
        (through processes, each of those steps preempts or queues what the lease could have held);
        the step it carries is only a prior — its span is still counted when it comes."""
        controller = self.controller
        if controller is None or controller.lease != 0 or demand.step_time <= 0:
            return None
        if not self._demand_of(demand).wants_blocks:
            return None
        prior = self._step_sample(
            step_time=demand.step_time, forward_time=demand.step_time, link_bandwidth=demand.link_bandwidth
        )
        return self.on_step(prior, demand)

    def on_step(self, step: StepSample | None, demand: proto.DemandReport) -> LeaseChange | None:
        """Feed one executor step's timings (or an idle tick, ``step=None``) and the scheduler's
        latest demand to the controller; a change when it moves the lease. Growing maps new
        segments at once; shrinking keeps them until released."""
        if self.controller is None:
            return None
        sample = self._demand_of(demand)
        self._last_preemptions = demand.num_preemptions
        if step is not None and self.prefetch is not None:
            self.prefetch.observe(step)
        decision = self.controller.observe(step, sample)
        if decision is None:
            return None
        self.decision_reason, self.target = decision.reason, decision.target
        command, ring_first = self._reshape_ring(decision.lease, decision.target)
        # A step reads every host block its requests hold: the lease never exceeds the ring.
        lease = min(decision.lease, self.num_staging_blocks) if self.prefetch is not None else decision.lease
        if lease == self.granted and command is None:
            return None
        attach: list[proto.HostSegmentInfo] = []
        if lease > self.manager.lease:
            attach, _ = self.manager.set_lease(lease)
        self.granted = lease
        return LeaseChange(lease, attach, command, ring_first)

    def _reshape_ring(self, lease: int, target: int) -> tuple[proto.PrefetchCommand | None, bool]:
        """The prefetch command for the controller's new measurements (None: keep the ring), and
        whether it goes before the lease (it widens the ring)."""
        if self.prefetch is None or self.controller is None:
            return None, False
        before = self.prefetch.current.num_staging_blocks
        plan = self.prefetch.decide(self.controller.bandwidth, target, lease)
        if plan is None:
            return None, False
        bandwidth = self.controller.bandwidth or 0.0
        reason = f"link {bandwidth / 1e6:.0f} MB/s, lease target {target}"
        return proto.PrefetchCommand(plan.depth, plan.num_staging_blocks, reason), plan.num_staging_blocks > before

    def _demand_of(self, demand: proto.DemandReport) -> DemandSample:
        """The controller's view of a report (preemptions counted since the last one observed)."""
        return self._demand_sample(
            num_waiting=demand.num_waiting,
            num_preemptions=demand.num_preemptions - self._last_preemptions,
            num_host_blocks_in_use=demand.num_host_blocks_in_use,
            short_of_blocks=demand.short_of_blocks,
            high_water=demand.host_blocks_high_water,
        )

    def next_lease_id(self) -> int:
        """Number the HostLease about to be sent (every one, grant or release alike)."""
        self.lease_id += 1
        return self.lease_id

    def release_ready(self, scheduler_lease: int, lease_id: int) -> list[int]:
        """Segment ids to unmap, on a release-safe report of the scheduler (it holds nothing above
        its lease ``scheduler_lease`` and no plan in flight touches it) written after it applied
        HostLease ``lease_id``."""
        # NOTE: only for the lease sent last, told by its number, not its size: a report written
        # before the scheduler applied a grant (the actors run concurrently) says nothing about the
        # blocks above it, and a lease that grew and shrank back to the size the report names has
        # attached segments whose blocks the scheduler may be about to use (issue 19's race).
        if lease_id != self.lease_id or scheduler_lease != self.granted or scheduler_lease >= self.manager.lease:
            return []
        _, released = self.manager.set_lease(scheduler_lease)
        return released

    def close(self) -> None:
        self.manager.close()


def kv_layout_for(config: EngineConfig) -> KVLayout:
    """The KV block layout of ``config``'s plan (the executor's pool has the same pages)."""
    import torch

    plan = plan_of(config)
    return KVLayout(plan.num_layers, config.block_size, plan.num_kv_heads, plan.head_dim, getattr(torch, plan.dtype))
