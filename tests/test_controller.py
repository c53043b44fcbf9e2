"""The adaptive expansion controller, open loop (hand-made samples) and closed loop against the
synthetic plant in ``workers/memory/simulate.py``."""

from __future__ import annotations

import statistics

import pytest

import proto
from proto.config import EngineConfig
from workers.memory.change import Change, ChangeDetector
from workers.memory.controller import (
    ControllerTuning,
    Decision,
    DemandSample,
    ExpansionController,
    StepSample,
)
from workers.memory.simulate import Phase, Plant, Trace, run

MAX_HOST_BLOCKS = 4000
TARGET = 0.02
BAND = (TARGET * 0.5, TARGET * 1.5)  # the default deadband around the target


def controller_for(plant: Plant, **kwargs) -> ExpansionController:
    return ExpansionController(MAX_HOST_BLOCKS, TARGET, host_block_bytes=plant.host_block_bytes, **kwargs)


def settle(plant: Plant, num_steps: int = 4000, **kwargs) -> tuple[ExpansionController, Trace]:
    controller = controller_for(plant, **kwargs)
    return controller, run(controller, plant, num_steps)


def reversals(leases: list[int]) -> int:
    """How often the lease changed direction (grow after shrink or shrink after grow)."""
    changes = [after - before for before, after in zip(leases, leases[1:]) if after != before]
    return sum((first > 0) != (second > 0) for first, second in zip(changes, changes[1:]))


def demand_sample(in_use: int, waiting: int = 1) -> DemandSample:
    return DemandSample(num_waiting=waiting, num_host_blocks_in_use=in_use, short_of_blocks=waiting > 0)


def stalled_step(blocks: int, stall_fraction: float, block_bytes: int = 1 << 20) -> StepSample:
    """A step of 10 ms compute reading ``blocks`` host blocks, with the given stall fraction."""
    compute = 0.010
    stall = compute * stall_fraction / (1 - stall_fraction)
    return StepSample(
        step_time=compute + stall,
        forward_time=compute + stall,
        stall_time=stall,
        num_host_blocks=blocks,
        bytes_to_device=blocks * block_bytes,
        num_layers=10,
        layer_compute_time=compute / 10,
    )


# ---------------------------------------------------------------- closed loop


@pytest.mark.parametrize(
    "how",
    ["stalls only", "measured copy time", "bandwidth prior"],
)
def test_grows_under_demand_to_the_bandwidth_limit_within_ten_decisions(how: str) -> None:
    plant = Plant(bandwidth=50e9, report_copy_time=how == "measured copy time")
    prior = {"link_bandwidth": 50e9} if how == "bandwidth prior" else {}
    controller, trace = settle(plant, num_steps=1600, **prior)
    limit = plant.transparent_limit()
    near = [index for index, lease in enumerate(trace.decisions) if abs(lease - limit) <= 0.15 * limit]
    assert near and near[0] < 10, trace.decisions[:12]
    # ... and stays there: no crawl, no drift, stalls within the band.
    assert all(abs(lease - limit) <= 0.1 * limit for lease in trace.decisions[-50:])
    assert trace.stall_fraction(800) <= BAND[1]
    if how != "stalls only":
        assert near[0] <= 2  # a known bandwidth lets the first decisions jump


@pytest.mark.parametrize("source", ["constructor", "executor's steps"])
def test_a_bandwidth_prior_jumps_from_zero_in_one_short_decision(source: str) -> None:
    plant = Plant(bandwidth=50e9, report_link_bandwidth=source == "executor's steps")
    controller = controller_for(plant, **({"link_bandwidth": 50e9} if source == "constructor" else {}))
    tuning = controller.tuning
    trace = run(controller, plant, tuning.first_window)
    assert tuning.first_window < tuning.decide_every
    assert len(trace.decisions) == 1  # demand against an empty lease: the first window is short
    limit = plant.transparent_limit()
    # 0 -> part of the way at once (no step has read host blocks yet), then the rest in one window.
    assert 0.9 * tuning.blind_jump * limit <= trace.decisions[0] <= limit
    assert controller.bandwidth == 50e9
    # Then most of the rest with each window, from below: no overshoot into stalls.
    run(controller, plant, 3 * tuning.decide_every, trace)
    assert (
        len(trace.decisions) == 4 and trace.decisions[1] >= 0.7 * limit and trace.decisions[3] >= 0.9 * limit
    )
    assert max(trace.decisions) <= 1.05 * limit


def test_idle_samples_do_not_delay_the_first_jump() -> None:
    plant = Plant(bandwidth=50e9, report_link_bandwidth=True, demand=lambda step: 0 if step < 5 else 1 << 30)
    controller = controller_for(plant)
    trace = run(controller, plant, 5 + controller.tuning.first_window)
    assert (
        trace.decisions
        and trace.decisions[-1] >= 0.9 * controller.tuning.blind_jump * plant.transparent_limit()
    )


def test_shrinks_when_the_link_is_throttled_and_settles_near_the_target() -> None:
    plant = Plant(bandwidth=50e9, noise=0.1, seed=1)
    controller, trace = settle(plant, num_steps=1600)
    before = statistics.mean(trace.decisions[-50:])
    plant.bandwidth = 15e9
    num_decisions = len(trace.decisions)
    run(controller, plant, 3200, trace)
    after = trace.decisions[num_decisions:]
    limit = plant.transparent_limit()
    assert after[8] < 0.5 * before  # proportional: a few decisions, not one block at a time
    assert all(0.7 * limit <= lease <= 1.1 * limit for lease in after[-100:])
    assert BAND[0] <= trace.stall_fraction(1600) <= BAND[1]
    assert trace.reasons[num_decisions].startswith("shrink: stalls")  # at the first decision


def test_exposed_first_layers_are_shrunk_in_a_few_moves_not_a_crawl() -> None:
    # Few layers and no next-step prefetch: every step waits for its first layer's load, so the
    # stalls fall far more slowly with the lease than a copy-bound model predicts.
    plant = Plant(
        bandwidth=50e9, num_layers=8, page_bytes=256 << 10, prefetch_next_step=False, noise=0.1, seed=1
    )
    controller, trace = settle(plant, num_steps=1600, link_bandwidth=50e9)
    limit = plant.stall_limit(TARGET)
    assert limit < 0.5 * plant.transparent_limit()  # the copy-bound model's limit is far off here
    moves = [lease for lease, reason in zip(trace.decisions, trace.reasons) if not reason.startswith("hold")]
    assert len(moves) <= 6, moves  # jump, then a few secant shrinks
    assert all(0.8 * limit <= lease <= 1.4 * limit for lease in trace.decisions[-100:])
    assert trace.stall_fraction(800) <= BAND[1]


def test_shrinking_from_the_whole_budget_does_not_compound_while_preemption_lags() -> None:
    # The scheduler gives blocks back 20 steps after a shrink: stalls persist meanwhile.
    plant = Plant(bandwidth=20e9, preempt_lag=20, fill_rate=20)
    controller, trace = settle(plant, num_steps=1600, initial_lease=MAX_HOST_BLOCKS)
    limit = plant.transparent_limit()
    assert min(trace.decisions) >= 0.75 * limit  # never shrunk past the limit by stale stalls
    assert abs(trace.decisions[-1] - limit) <= 0.1 * limit


def test_returns_memory_without_demand_and_jumps_back_when_it_returns() -> None:
    plant = Plant(bandwidth=50e9)
    controller, trace = settle(plant, num_steps=800)
    settled = controller.lease
    release_after = controller.tuning.release_after

    plant.demand = lambda step: 40  # fewer blocks wanted than leased: usage falls, nobody waits
    start = len(trace.decisions)
    run(controller, plant, 8 * (release_after + 2), trace)
    assert trace.decisions[start : start + release_after - 1] == [settled] * (release_after - 1)
    assert controller.lease == 50  # usage plus 25% headroom
    assert controller.decision.reason in ("release: no demand", "hold: no demand")

    plant.demand = lambda step: 0
    run(controller, plant, 8 * (release_after + 1), trace)
    assert controller.lease == 0

    plant.demand = lambda step: 1 << 30
    start = len(trace.decisions)
    run(controller, plant, 8 * 3, trace)
    # The model is remembered: most of the way back at once, the rest with the next jump.
    assert (
        trace.decisions[start] >= 0.7 * settled and max(trace.decisions[start : start + 3]) >= 0.9 * settled
    )


def test_an_idle_engine_gives_its_host_memory_back() -> None:
    controller = ExpansionController(1000, initial_lease=600)
    decisions = []
    for _ in range(controller.tuning.decide_every * controller.tuning.release_after):
        decision = controller.observe(None, DemandSample())
        if decision is not None:
            decisions.append(decision)
    assert [decision.action for decision in decisions] == ["hold", "hold", "release"]
    assert decisions[-1] == Decision(0, 600, "release: no demand")


@pytest.mark.parametrize("bandwidth", [10e9, 50e9, 200e9])
def test_steady_under_noise(bandwidth: float) -> None:
    # +-20% multiplicative noise on every step's compute, copy and overhead times.
    plant = Plant(bandwidth=bandwidth, noise=0.2, seed=7)
    controller, trace = settle(plant, num_steps=6000)
    settled = trace.decisions[150:]  # the first 1200 steps find the limit
    median = statistics.median(settled)
    assert reversals(settled) <= 6, settled
    assert all(abs(lease - median) <= 0.15 * median for lease in settled)
    assert BAND[0] <= trace.stall_fraction(4800) <= BAND[1]
    # Noise puts the settled lease a little below the noise-free limit, not far from it.
    assert 0.75 * plant.transparent_limit() <= median <= 1.05 * plant.transparent_limit()


def test_a_lower_bandwidth_settles_on_a_lower_lease() -> None:
    settled = []
    for bandwidth in (10e9, 30e9, 100e9):
        plant = Plant(bandwidth=bandwidth, noise=0.2, seed=3)
        controller, trace = settle(plant, num_steps=3200)
        settled.append(statistics.mean(trace.leases[-1600:]))
    assert settled[0] < settled[1] < settled[2], settled
    assert settled[2] / settled[0] > 5  # roughly proportional to the bandwidth (10x here)


# ---------------------------------------------------------------- a changing workload

SETTLE_STEPS = 1000  # steps before the first change
PHASE_STEPS = 600  # steps of each later phase
CONVERGE_STEPS = 50  # the lease is near the new limit this many steps after a change


def phases_of(kind: str, scale: float) -> tuple[Phase, ...]:
    """``kind`` scales by ``scale`` for a phase, then returns: both directions of one change."""
    field = {"compute time": "compute_scale", "link bandwidth": "bandwidth_scale"}[kind]
    return (Phase(SETTLE_STEPS, **{field: scale}), Phase(SETTLE_STEPS + PHASE_STEPS))


@pytest.mark.parametrize(
    "kind, scale, copy_time, outliers",
    [
        # Many short requests -> few long-context ones: the step's compute time halves, or doubles.
        ("compute time", 0.5, True, 0.0),
        ("compute time", 2.0, True, 0.0),
        # The same when the executor does not measure its copy time (stalls reveal the bandwidth).
        ("compute time", 0.5, False, 0.0),
        ("compute time", 2.0, False, 0.0),
        # Another tenant takes three quarters of the host link, and leaves; or the link was shared
        # at start (a quarter of it here) and is freed for a while.
        ("link bandwidth", 0.25, True, 0.0),
        ("link bandwidth", 4.0, True, 0.0),
        # On a busy CPU: one step in ten reports its compute time 4x too long, and (independently)
        # one in ten its copy time. Such steps must neither hide the change nor fake another.
        ("compute time", 0.5, True, 0.1),
        ("compute time", 2.0, True, 0.1),
        ("link bandwidth", 0.25, True, 0.1),
        ("link bandwidth", 4.0, True, 0.1),
    ],
)
def test_follows_a_change_and_its_reversal_within_fifty_steps(
    kind: str, scale: float, copy_time: bool, outliers: float
) -> None:
    bandwidth = 50e9 if scale <= 1 or kind != "link bandwidth" else 12.5e9
    plant = Plant(
        bandwidth=bandwidth,
        noise=0.1,
        seed=1,
        report_copy_time=copy_time,
        phases=phases_of(kind, scale),
        outlier_rate=outliers,
    )
    controller, trace = settle(plant, num_steps=SETTLE_STEPS + 2 * PHASE_STEPS)
    assert_follows_each_change(plant, trace)
    # The change detection re-planned (a change in the window right after a move is caught by
    # the stalls instead: the compute time is only compared once the move has landed).
    replans = [reason for reason in trace.reasons if reason.endswith("re-planned")]
    assert replans and all(kind in reason for reason in replans), trace.reasons
    assert len(replans) <= 2  # one per change, none from noise


def assert_follows_each_change(plant: Plant, trace: Trace) -> None:
    """Within CONVERGE_STEPS of each change the lease is within 0.8-1.25 of the new limit and stays
    there, with at most 2 direction changes over the phase and its stalls in the band."""
    for start in (SETTLE_STEPS, SETTLE_STEPS + PHASE_STEPS):
        end = start + PHASE_STEPS
        limit = plant.transparent_limit(start)
        assert not 1 / 1.4 < limit / plant.transparent_limit(start - 1) < 1.4  # a material change
        settled = trace.leases[start + CONVERGE_STEPS : end]
        assert all(0.8 * limit <= lease <= 1.25 * limit for lease in settled), (start, limit, settled[:20])
        assert reversals(trace.leases[start - 1 : end]) <= 2, trace.leases[start - 1 : end]
        # Stalls on the plant's clock, after settling: within the band.
        assert trace.stall_fraction_between(start + CONVERGE_STEPS, end) <= BAND[1]


@pytest.mark.parametrize("kind, scale", [("compute time", 3.0), ("link bandwidth", 4.0)])
def test_a_few_steps_of_good_news_do_not_raise_the_lease_and_lasting_news_does(
    kind: str, scale: float
) -> None:
    # A few prefill-heavy steps after admissions (3x the compute time of the decode steps around
    # them), or a link that is fast for a moment: a change to the detector, not to the steady
    # steps. Re-planned at once, the lease would jump far past what those steps hide, and the
    # stalls that take it back cost more than the wait. Growth waits for change_steps more steps.
    field = {"compute time": "compute_scale", "link bandwidth": "bandwidth_scale"}[kind]
    transient = 8  # steps: beyond the detector's 6, within its confirmation
    phases = (Phase(SETTLE_STEPS, **{field: scale}), Phase(SETTLE_STEPS + transient))
    plant = Plant(bandwidth=12.5e9, noise=0.1, seed=1, report_copy_time=True, phases=phases)
    controller, trace = settle(plant, num_steps=SETTLE_STEPS + PHASE_STEPS)
    limit = plant.transparent_limit(SETTLE_STEPS - 1)
    after = trace.leases[SETTLE_STEPS:]
    assert all(lease <= 1.25 * limit for lease in after), after[:40]
    assert not [reason for reason in trace.reasons if reason.startswith("grow: " + kind)], trace.reasons
    assert f"hold: {kind} " in " ".join(trace.reasons)  # it was seen, and waited out
    # The same change, lasting: the lease follows it within the same 50 steps as a bad one.
    lasting = Plant(bandwidth=12.5e9, noise=0.1, seed=1, report_copy_time=True, phases=phases[:1])
    controller, trace = settle(lasting, num_steps=SETTLE_STEPS + PHASE_STEPS)
    new_limit = lasting.transparent_limit(SETTLE_STEPS)
    settled = trace.leases[SETTLE_STEPS + CONVERGE_STEPS :]
    assert all(0.8 * new_limit <= lease <= 1.25 * new_limit for lease in settled), settled[:20]
    assert any(reason.startswith("grow: " + kind) for reason in trace.reasons), trace.reasons


@pytest.mark.parametrize("copy_time, outliers", [(True, 0.0), (False, 0.0), (True, 0.1)])
def test_follows_short_requests_to_long_contexts_and_back(copy_time: bool, outliers: float) -> None:
    # Many short requests, then a few long-context ones, then short ones again: in the long phase
    # the batch is smaller (compute per step 0.4x) while each request holds far more blocks (the
    # host demand triples), so more blocks want streaming in less compute time.
    phases = (Phase(SETTLE_STEPS, compute_scale=0.4), Phase(SETTLE_STEPS + PHASE_STEPS))
    short_limit = Plant(bandwidth=50e9).transparent_limit()

    def demand(step: int) -> int:
        long = SETTLE_STEPS <= step < SETTLE_STEPS + PHASE_STEPS
        return round((4.5 if long else 1.5) * short_limit)

    plant = Plant(
        bandwidth=50e9,
        noise=0.1,
        seed=2,
        report_copy_time=copy_time,
        phases=phases,
        demand=demand,
        outlier_rate=outliers,  # one step in ten reports its compute (or copy) time 4x too long
    )
    _, trace = settle(plant, num_steps=SETTLE_STEPS + 2 * PHASE_STEPS)
    assert_follows_each_change(plant, trace)


@pytest.mark.parametrize("outliers", [0.0, 0.1])
@pytest.mark.parametrize("bandwidth", [10e9, 50e9, 200e9])
def test_noise_alone_is_never_a_change(bandwidth: float, outliers: float) -> None:
    # +-20% on every step's compute, copy and overhead times, a batch whose compute time grows
    # with the lease (up to 1.7x at 200 GB/s) and a scheduler that fills a grown lease over many
    # steps: the controller's own moves are not mistaken for a change, and neither is noise, nor
    # one step in ten reporting its compute or copy time 4x too long.
    plant = Plant(
        bandwidth=bandwidth,
        noise=0.2,
        seed=7,
        report_copy_time=True,
        layer_compute_per_block=2e-7,
        fill_rate=20,
        outlier_rate=outliers,
    )
    _, trace = settle(plant, num_steps=4000)
    assert not [reason for reason in trace.reasons if "re-planned" in reason]


def test_a_change_is_the_recent_median_beyond_the_spread_of_the_reference() -> None:
    quiet = [1.0, 0.95, 1.05, 0.98, 1.02, 0.97, 1.03, 1.0]  # +-5%: the threshold (1.3x) is the bar
    detector = ChangeDetector(threshold=0.3, steps=4, reference_steps=64, min_reference=8)
    assert [detector.observe(value, None) for value in quiet] == [None] * 8  # the reference
    # Slow steps alone, or two of four, are noise (and join the reference as they age).
    for value in (1.3, 0.8, 1.5, 1.0, 0.6, 0.6, 1.0, 1.0):
        assert detector.observe(value, None) is None, value
    assert detector.run_length == 0
    # A new level: an unmeasured step is no step, and the one a busy CPU delayed 9x neither makes
    # the change (two of four recent steps) nor hides it (three of four: the median moved).
    changes = [detector.observe(value, None) for value in (2.0, None, 9.0)]
    assert changes == [None] * 3 and detector.run_length == 2
    assert detector.observe(2.0, None) == Change("compute time", pytest.approx(2.0), num_steps=3)
    assert detector.run_length == 0
    # The recent steps are the reference now: more of the same is no change.
    assert all(detector.observe(value, None) is None for value in [2.1, 1.9, 2.0, 2.2] * 2)
    # The link, on its own reference (a compute time of 0.2 would be a change, but after a move
    # both are measured afresh: the move changed the batch).
    detector.forget()
    for bandwidth in (100.0, 101.0, 99.0, 100.0, 102.0, 98.0, 100.0, 100.0):
        assert detector.observe(0.2, bandwidth) is None
    changes = [detector.observe(0.2, value) for value in (25.0, 24.0, 200.0, 26.0)]
    assert changes[:3] == [None] * 3
    assert changes[3] == Change("link bandwidth", pytest.approx(0.255, rel=1e-3), num_steps=4)

    # On a noisy plant (step times over 10x, as on a busy CPU) the same shifts are part of the spread,
    noisy = ChangeDetector(threshold=0.3, steps=4, reference_steps=64, min_reference=8)
    for value in [0.3, 3.0, 1.0, 0.5, 2.0, 0.4, 2.5, 1.0] * 2:
        assert noisy.observe(value, None) is None
    assert all(noisy.observe(value, None) is None for value in [2.0] * 4 + [0.5] * 4)
    # ... and a change must stand out from it: a 16x cut of the link does.
    for value in [0.3, 3.0, 1.0, 0.5, 2.0, 0.4, 2.5, 1.0] * 2:
        assert noisy.observe(None, value) is None
    changes = [noisy.observe(None, value / 16) for value in (0.3, 3.0, 1.0, 0.5)]
    assert changes[:3] == [None] * 3 and changes[3] is not None and changes[3].quantity == "link bandwidth"
    with pytest.raises(ValueError, match="threshold"):
        ChangeDetector(threshold=0.0, steps=4)


def test_a_change_forgets_the_ceiling_of_the_old_plant() -> None:
    # The link was shared when stalls set a ceiling (the lowest lease that stalled); it is freed:
    # the lease goes past the ceiling within a few windows instead of probing up to it.
    plant = Plant(bandwidth=12.5e9, report_copy_time=True, phases=(Phase(800, bandwidth_scale=4.0),))
    controller, trace = settle(plant, num_steps=800, initial_lease=MAX_HOST_BLOCKS)
    stalled = [
        lease for lease, reason in zip(trace.decisions, trace.reasons[1:]) if reason.startswith("shrink")
    ]
    ceiling = min(stalled)
    assert controller.lease < ceiling < 0.9 * plant.transparent_limit(800)
    run(controller, plant, 24, trace)
    assert "grow: link bandwidth 4x, re-planned" in trace.reasons
    assert controller.lease >= 0.9 * plant.transparent_limit(800) > ceiling


# ---------------------------------------------------------------- open loop


def test_shrink_waits_for_consistent_evidence_after_a_grow_unless_stalls_are_far_over() -> None:
    controller = ExpansionController(1000, tuning=ControllerTuning(decide_every=4, first_window=4))
    for _ in range(4):
        controller.observe(StepSample(step_time=0.01, forward_time=0.01), demand_sample(0))
    assert controller.decision.action == "grow"
    lease = controller.lease
    for _ in range(4):
        decision = controller.observe(stalled_step(lease, 0.05), demand_sample(lease))
    assert decision == Decision(lease, decision.target, "hold: confirming shrink")
    decisions = [controller.observe(stalled_step(lease, 0.30), demand_sample(lease)) for _ in range(3)]
    # Three steps in a row each stalled over 4x the target close the window a step early.
    assert decisions[:2] == [None, None] and decisions[2].action == "shrink" and decisions[2].lease < lease
    assert decisions[2].reason == "shrink: stalls 30% > 2%"


def test_a_run_of_strongly_stalled_steps_is_acted_on_before_the_window_ends_and_one_step_is_not() -> None:
    tuning = ControllerTuning(decide_every=16)
    controller = ExpansionController(1000, initial_lease=400, tuning=tuning)
    # A step stalled 40% between steps stalled 1% (a copy delayed on a busy CPU): only whole windows.
    pattern = [0.01, 0.01, 0.4, 0.01, 0.4, 0.4, 0.01, 0.01] * 2
    decisions = [controller.observe(stalled_step(400, fraction), demand_sample(400)) for fraction in pattern]
    assert decisions[:-1] == [None] * 15 and decisions[-1].action == "shrink"
    lease = controller.lease
    # The shrink landed (the blocks above it moved); its first landing_steps steps measure that
    # traffic, not the new lease: no evidence, however they stalled.
    landing = [controller.observe(stalled_step(lease, 0.4), demand_sample(lease)) for _ in range(2)]
    assert landing == [None, None] and tuning.landing_steps == 2
    # The link is cut: the third step in a row stalled 40% decides (16 steps would be a window).
    decisions = [controller.observe(stalled_step(lease, 0.4), demand_sample(lease)) for _ in range(3)]
    assert decisions[:2] == [None, None] and decisions[2].action == "shrink"
    # Proportionally, to about the blocks that would have stalled the target (not a small step).
    assert decisions[2].lease < 0.7 * lease


def test_a_re_plan_starts_the_run_of_strongly_stalled_steps_afresh() -> None:
    """Steps stalled before a change was detected are the old plant's: they neither count towards
    the run that closes a window early nor make a one-step window of the next stalled step."""
    controller = ExpansionController(1000, initial_lease=400)

    def step(compute: float, stall_fraction: float) -> StepSample:
        stall = compute * stall_fraction / (1 - stall_fraction)
        return StepSample(step_time=compute + stall, forward_time=compute + stall, stall_time=stall,
                          num_host_blocks=400, bytes_to_device=400 << 20)  # fmt: skip

    idle = DemandSample(num_waiting=0, num_host_blocks_in_use=400)
    for _ in range(16):  # the reference: 10 ms steps, no stall (two windows without demand: holds)
        controller.observe(step(0.010, 0.0), idle)
    # The compute time halves; the fifth such step of six is a change.
    decisions = [controller.observe(step(0.005, 0.0), idle) for _ in range(3)]
    decisions += [controller.observe(step(0.005, 0.4), idle) for _ in range(2)]  # a run of 2 ...
    assert decisions[:4] == [None] * 4
    assert decisions[4].reason.endswith("compute time 0.5x, re-planned")  # ... ended by the re-plan
    assert controller.observe(step(0.005, 0.4), idle) is None  # the third is the new run's first


def test_a_shrink_that_has_not_landed_is_not_shrunk_again() -> None:
    controller = ExpansionController(1000, initial_lease=1000, tuning=ControllerTuning(decide_every=4))
    decisions = []
    for _ in range(40):
        # The scheduler still holds (and the step still reads) all 1000 blocks.
        decision = controller.observe(stalled_step(1000, 0.30), demand_sample(1000))
        if decision is not None:
            decisions.append(decision)
    first = decisions[0]
    assert first.action == "shrink" and 250 <= first.lease < 1000
    assert all(
        decision == Decision(first.lease, decision.target, "hold: shrink pending")
        for decision in decisions[1:]
    )


def test_the_traffic_of_a_landing_shrink_is_not_evidence_for_another() -> None:
    # Stalls 30% at 400 blocks: shrink. The scheduler moves the blocks above the new lease to the
    # device over the next steps (copies on the same link) and recomputes what it preempted, so
    # those steps stall hard whatever the lease; then the lease turns out right (1% stalls).
    controller = ExpansionController(1000, initial_lease=400, tuning=ControllerTuning(decide_every=8))
    for _ in range(3):
        decision = controller.observe(stalled_step(400, 0.3), demand_sample(400))
    assert decision.action == "shrink"
    lease = controller.lease
    decisions = [controller.observe(stalled_step(400, 0.4), demand_sample(400)) for _ in range(3)]  # landing
    decisions += [controller.observe(stalled_step(lease, 0.4), demand_sample(lease)) for _ in range(2)]  # landed
    decisions += [controller.observe(stalled_step(lease, 0.01), demand_sample(lease)) for _ in range(32)]
    made = [decision for decision in decisions if decision is not None]
    assert made and all(decision.lease == lease for decision in made), made
    assert not [decision for decision in made if decision.action == "shrink"]


def test_a_starved_engine_grows_whatever_the_stalls_and_is_not_shrunk_back() -> None:
    # A long context arrives that the lease cannot hold: the scheduler idles with it waiting, so
    # only idle ticks come, with demand and a lease far from full (the lease is fragmented, not
    # unused). Waiting for it to fill, or shrinking on the stalls measured before, would deadlock.
    tuning = ControllerTuning(decide_every=4, first_window=4)
    controller = ExpansionController(1000, tuning=tuning, initial_lease=40)
    for _ in range(8):  # stalls well above the band at 40
        controller.observe(stalled_step(40, 0.05), demand_sample(40, waiting=0))
    starved = controller.lease
    for _ in range(4):
        controller.observe(None, demand_sample(10))
    grown = controller.lease
    assert grown == 2 * starved and controller.decision.reason == "grow: starved, requests wait and no step runs"
    for _ in range(16):  # it runs now, stalling hard: held, not shrunk back into starvation
        controller.observe(stalled_step(grown, 0.3), demand_sample(grown, waiting=0))
    assert controller.lease == grown and controller.decision.reason.startswith("hold: stalls")
    for _ in range(4 * tuning.release_after):  # demand ends: the floor goes with it
        controller.observe(None, DemandSample(num_host_blocks_in_use=grown, high_water=grown))
    for _ in range(8):
        controller.observe(stalled_step(grown, 0.3), demand_sample(grown, waiting=0))
    assert controller.lease < grown


def test_a_starved_grow_ends_a_landing_shrink() -> None:
    # A shrink, then a long context starves the engine before any step at the new lease ran: the
    # grow replaces the shrink, so the steps it lets run are evidence, not the shrink's landing.
    controller = ExpansionController(1000, initial_lease=400, tuning=ControllerTuning(decide_every=2))
    for _ in range(2):
        controller.observe(stalled_step(400, 0.3), demand_sample(400, waiting=0))
    assert controller.decision.action == "shrink"
    for _ in range(2):
        controller.observe(None, demand_sample(10))
    grown = controller.lease
    assert controller.decision.reason == "grow: starved, requests wait and no step runs"
    for _ in range(2):
        controller.observe(stalled_step(grown // 2, 0.3), demand_sample(grown // 2, waiting=0))
    assert controller.decision.reason == "hold: stalls, at the lease a starved engine needed"


def test_growth_needs_demand_and_a_filled_lease() -> None:
    controller = ExpansionController(1000, initial_lease=100, tuning=ControllerTuning(decide_every=4))
    for _ in range(4):
        decision = controller.observe(stalled_step(30, 0.0), demand_sample(30))
    assert decision.reason == "hold: lease not full"
    for index in range(4):  # one waiting request in one sample of four is not demand
        decision = controller.observe(stalled_step(100, 0.0), demand_sample(100, waiting=int(index == 0)))
    assert decision.reason == "hold: no demand"
    for _ in range(4):
        decision = controller.observe(stalled_step(100, 0.0), demand_sample(100))
    assert decision.reason == "grow: demand, stalls 0% < 2%" and decision.lease > 100


def test_release_keeps_headroom_and_does_not_flap() -> None:
    tuning = ControllerTuning(decide_every=4)
    controller = ExpansionController(1000, initial_lease=110, tuning=tuning)
    decisions = []
    for _ in range(4 * 10):
        decision = controller.observe(stalled_step(100, 0.0), demand_sample(100, waiting=0))
        if decision is not None:
            decisions.append(decision)
    # 110 is within usage * 1.25: nothing worth returning, so the lease never moves.
    assert {decision.lease for decision in decisions} == {110}
    assert decisions[-1].reason == "hold: no demand"


def test_a_release_never_goes_below_a_block_in_use() -> None:
    # 100 blocks in use, but the highest at index 699: releasing to 125 would move 1 block in 4
    # (or preempt its request) although nobody asked for memory.
    controller = ExpansionController(1000, initial_lease=1000, tuning=ControllerTuning(decide_every=4))

    def leases(demand: DemandSample) -> list[int]:
        decisions = [controller.observe(stalled_step(100, 0.0), demand) for _ in range(4 * 4)]
        return [decision.lease for decision in decisions if decision is not None]

    assert leases(DemandSample(num_host_blocks_in_use=100, high_water=700)) == [1000, 1000, 700, 700]
    assert controller.decision.reason == "hold: no demand"
    # The high ones finished: usage plus 25% headroom.
    assert leases(DemandSample(num_host_blocks_in_use=100, high_water=100)) == [125, 125, 125, 125]


def test_edge_cases_never_divide_by_zero() -> None:
    controller = ExpansionController(100)
    assert controller.decide() == Decision(0, 0, "hold: no samples")
    odd_steps = [
        StepSample(step_time=0.0),  # nothing measured at all
        StepSample(step_time=0.0, stall_time=0.01, num_host_blocks=5),  # stall but no step time
        StepSample(step_time=0.01, num_host_blocks=5),  # host blocks, zero bytes, zero compute
        StepSample(step_time=0.01, bytes_to_device=1 << 20),  # bytes without host blocks
        StepSample(
            step_time=0.01, forward_time=0.005, stall_time=0.009, num_host_blocks=3, bytes_to_device=3
        ),
        StepSample(step_time=-1.0, forward_time=-1.0, stall_time=-1.0, copy_time=-1.0),  # clock noise
    ]
    for step in odd_steps:
        for in_use in (0, 5, 500):
            controller.observe(step, demand_sample(in_use))
            decision = controller.decide()
            assert 0 <= decision.lease <= 100 and 0 <= decision.target <= 100
            assert decision.action in ("grow", "shrink", "release", "hold")
    nothing = ExpansionController(0)  # no host memory configured: never grows
    for _ in range(16):
        nothing.observe(StepSample(step_time=0.01), demand_sample(0))
    assert nothing.lease == 0 and nothing.decision.reason == "hold: at max"


def test_step_sample_from_a_step_result() -> None:
    result = proto.StepResult(
        step_id=3,
        sampled_token_ids=b"",
        forward_time=0.012,
        step_time=0.015,
        num_host_blocks=7,
        bytes_to_device=7 << 20,
        bytes_to_host=1 << 20,
        stall_time=0.001,
        layer_compute_time=0.0005,
        copy_time=0.004,
        link_bandwidth=3e9,
    )
    sample = StepSample.from_result(result, num_layers=22)
    assert sample.compute_time == pytest.approx(22 * 0.0005)
    assert (sample.num_host_blocks, sample.bytes_to_device, sample.stall_time) == (7, 7 << 20, 0.001)
    assert (sample.bytes_to_host, sample.copy_time, sample.link_bandwidth) == (1 << 20, 0.004, 3e9)


def test_measured_copy_time_counts_both_directions() -> None:
    controller = ExpansionController(1000, initial_lease=100, tuning=ControllerTuning(decide_every=1))
    step = StepSample(
        step_time=0.01,
        forward_time=0.01,
        num_host_blocks=100,
        bytes_to_device=6 << 20,
        bytes_to_host=2 << 20,
        copy_time=0.008,
        link_bandwidth=1e12,  # the prior gives way to what the step measured
    )
    controller.observe(step, demand_sample(100))
    assert controller.bandwidth == pytest.approx((8 << 20) / 0.008)
    assert StepSample(step_time=0.02, forward_time=0.015, stall_time=0.005).compute_time == pytest.approx(
        0.01
    )


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="stall_target"):
        ExpansionController(10, stall_target=0.0)
    with pytest.raises(ValueError, match="max_host_blocks"):
        ExpansionController(-1)
    with pytest.raises(ValueError, match="deadband"):
        ControllerTuning(deadband=1.0)
    with pytest.raises(ValueError, match="evidence_windows"):
        ControllerTuning(confirm_windows=5, evidence_windows=8)
    for bad in (
        dict(first_window=0),
        dict(blind_jump=0.0),
        dict(jump=1.5),
        dict(far=-0.1),
        dict(secant_spread=1.0),
        dict(change_steps=0),
        dict(change_threshold=0.0),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ControllerTuning(**bad)
    assert ExpansionController(10, initial_lease=50).lease == 10  # clamped to the budget


def test_the_memory_manager_grants_from_the_demand_report_before_any_step_span(tmp_path) -> None:
    """Through processes the step spans reach the memory manager a step or more late: the first
    grant is sized from the report in which demand meets the empty lease (its last step's time and
    the executor's link benchmark), and later reports leave the lease to the spans."""
    from tiny_models import build_model_dir

    from pied.preflight import preflight
    from workers.memory.manager import HostMemory

    model = build_model_dir(tmp_path / "model", "llama")
    config = preflight(
        EngineConfig(model=str(model), dtype="float32", device="cpu", block_size=4, kv_policy="pie", host_kv_gib=0.002)
    )
    memory = HostMemory(config)
    try:
        assert memory.start().lease == 0
        assert memory.on_demand(proto.DemandReport(0, 0, 0, False, 0, idle=True, step_time=0.01)) is None
        assert memory.on_demand(proto.DemandReport(3, 0, 0, True, 0)) is None  # no step yet: nothing to size from
        bandwidth, step_time = 1e8, 0.01
        report = proto.DemandReport(3, 0, 0, True, 0, step_time=step_time, link_bandwidth=bandwidth)
        change = memory.on_demand(report)
        assert change is not None and change.attach and memory.lease == change.lease
        # Blind (no step has read a host block yet): that share of the modelled limit, at once.
        limit = bandwidth * step_time / memory.layout.block_bytes
        blind = ControllerTuning().blind_jump
        assert 0.9 * blind * limit <= change.lease <= 1.1 * blind * limit + 1 < memory.max_host_blocks
        assert memory.on_demand(report) is None  # the lease is not empty: the spans steer from here
    finally:
        memory.close()
