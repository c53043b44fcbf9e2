"""Adaptive expansion vs the best static lease, on workloads whose best static lease stays put and
on workloads where it changes mid-run. For each scenario: every ``fixed:N`` of a sweep on the same
request stream, then ``adaptive`` with the sweep's largest N as its host budget (no tuning by hand,
so it may choose anything a static run could), in ``--pairs`` adaptive / best-N pairs next to each
other in time (the median ratio is reported, so a noisy moment of a shared machine does not decide
it). Prints one JSON line; with --plot, a PNG of the lease and the stall fraction over time.

Two static baselines. The best N: the highest throughput, whatever it stalled. The best
*transparent* N: the highest throughput among the Ns that stalled at most ``--stall-limit`` (2%)
in every phase, the promise adaptive expansion is itself held to. Where stalls are cheap (this
CPU, whose larger batch gains more than a quarter of its time stalled costs) the first is a lease
no operator who asked for transparent swapping would run; the two-phase targets are judged on the
second (``perf/report.py``), and both are reported.

    python perf/adaptive.py [--quick] [--pairs 5] [--scenarios link,throttled_link,short_long,throttle_cut]
                            [--workers processes|threads] [--plot docs/adaptive.png]

Scenarios (the CPU's copy thread throttled to emulate a slower link; ``--throttle`` sets it):

- ``link``: the pooling workload on the machine's own link (steady: the best N is the largest);
- ``throttled_link``: the same on a throttled link (steady: the best N is inside the sweep);
- ``short_long``: many short requests, then a few long-context ones, then short ones again, on the
  throttled link: the step's compute time and the host blocks a step reads change with the phase,
  and with them the largest transparent lease. Each phase is a burst submitted once the previous
  one has finished, so the phases do not blur into each other;
- ``throttle_cut``: the pooling workload on the throttled link, cut to a quarter of it once half
  of the requests have finished (another tenant taking three quarters of the link). The executor
  re-reads a test-only throttle file between steps (``workers/executor/copy_throttle.py``).

Through the engine as production runs it (worker processes; ``--workers threads`` as an option):
the controller is fed by the executor's step spans over ZeroMQ and the scheduler's demand reports,
as in the daemon. A trace is sampled from the frontend's Stats snapshots every 20 ms, so steps are
counted at that resolution. Per scenario: ``throughput_ratio_adaptive_vs_best_fixed`` and
``throughput_ratio_adaptive_vs_best_transparent_fixed`` (of one adaptive run: the median pair's),
``phases`` (per phase of the median adaptive run: its first step, ``stall_fraction``,
``steps_to_converge`` after the change that began it, the lease it settled on) and, for every run,
``phase_seconds`` and ``phase_stall_fractions`` (from the executor's totals at each change, exact),
so the best N of each phase can be read off the sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import add_workers_arg, emit, machine, one_torch_thread, started_engine, warm_up
from pooling import sample_stats, workload, workload_model

import proto
from proto.config import EngineConfig
from workers.memory.manager import kv_layout_for

# The throttled link: slow enough that the largest static lease stalls on it, so the best static N
# is inside the sweep and adaptive has to find it rather than take everything.
THROTTLED_LINK = 0.25e9
CUT = 0.25  # throttle_cut: the share of the link left once the second tenant arrives
BLOCK_SIZE = 16
SCENARIOS = ("link", "throttled_link", "short_long", "throttle_cut")


@dataclass
class Scenario:
    """``phases``: request bursts (pooling.workload's dicts, arrivals relative to the burst), each
    submitted once the previous one has finished; ``throttle``: the link in bytes/s (None: the
    machine's); ``cut_to``: the link once half of the requests have finished (None: no cut)."""

    name: str
    phases: list[list[dict]]
    throttle: float | None = None
    cut_to: float | None = None
    sweep: list[int] = field(default_factory=list)

    @property
    def num_requests(self) -> int:
        return sum(len(phase) for phase in self.phases)


@dataclass
class Run:
    """What one run measured; ``changes``: the step count at each change (phase start or cut)."""

    result: dict
    trace: list = field(default_factory=list)
    changes: list[int] = field(default_factory=list)


def scenarios_for(quick: bool, throttle: float, names: list[str]) -> tuple[str, int, list[Scenario]]:
    """The model folder, device budget and the scenarios named, each with its static-N sweep."""
    model_dir, requests, device_blocks, fixed_ns = workload_model(quick)
    vocab = 8192 if quick else 49152
    scale = 1 if quick else 2
    short = dict(rate=40.0, prompt_range=(32, 128), output_range=(16, 48), vocab=vocab)
    # Long contexts that still fit the smallest static lease with the device blocks (so every
    # static run can serve every request), a few at a time.
    long_prompts = (480, 704) if quick else (960, 1400)
    long = dict(rate=40.0, prompt_range=long_prompts, output_range=(32, 64), vocab=vocab)
    # Each sweep runs from below the smallest transparent lease of any phase (so the best N, and
    # the best N that stalls at most the limit in every phase, are inside it) up to where more host
    # memory stops paying: the link's largest, a throttled link's half of that.
    lowest, highest = min(fixed_ns), max(fixed_ns)
    link_sweep = [lowest // 2, *fixed_ns, 2 * highest]
    throttled_sweep = [lowest // 2, *fixed_ns]
    built = {
        "link": Scenario("link", [requests], sweep=link_sweep),
        "throttled_link": Scenario("throttled_link", [requests], throttle=throttle, sweep=throttled_sweep),
        "short_long": Scenario(
            "short_long",
            [
                workload(32 * scale, seed=1, **short),
                workload(6 * scale, seed=2, **long),
                workload(32 * scale, seed=3, **short),
            ],
            throttle=throttle,
            sweep=throttled_sweep,
        ),
        # A quarter of the link takes about a quarter of the lease: the sweep goes that far down.
        "throttle_cut": Scenario(
            "throttle_cut",
            [requests],
            throttle=throttle,
            cut_to=CUT * throttle,
            sweep=[lowest // 8, lowest // 4, *throttled_sweep],
        ),
    }
    chosen = []
    for name in names:
        if name not in built:
            raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        scenario = built[name]
        # Every static run must serve every request: no N below what the longest needs.
        longest = max(
            -(-(len(r["prompt"]) + r["max_tokens"]) // BLOCK_SIZE) for phase in scenario.phases for r in phase
        )
        scenario.sweep = [n for n in scenario.sweep if n + device_blocks >= longest]
        chosen.append(scenario)
    return model_dir, device_blocks, chosen


def run_scenario(model_dir: str, scenario: Scenario, workers: str, keep_trace: bool, **overrides) -> Run:
    return asyncio.run(_run(model_dir, scenario, workers, keep_trace, **overrides))


async def _run(model_dir: str, scenario: Scenario, workers: str, keep_trace: bool, **overrides) -> Run:
    with tempfile.TemporaryDirectory(prefix="pied-adaptive-") as scratch:
        control = Path(scratch) / "copy-throttle"
        write_throttle(control, scenario.throttle)
        extra = {"copy_throttle_file": str(control)} if scenario.throttle else {}
        config = EngineConfig(
            model=model_dir, dtype="float32", block_size=BLOCK_SIZE, extra=extra, **overrides
        )
        async with started_engine(config, workers) as engine:
            first = scenario.phases[0][0]
            await warm_up(engine, first["prompt"][:8])
            before = engine.stats()
            run = Run({})
            trace: list = []
            start = time.perf_counter()
            sampler = asyncio.ensure_future(sample_stats(engine, start, trace)) if keep_trace else None
            counts: dict[str, int] = {}
            finished = 0
            # The executor's totals at each change: every run's stall fraction per phase, exactly
            # (not from the sampled trace, which only the adaptive runs keep).
            marks = [before]

            def change() -> None:
                marks.append(engine.stats())
                run.changes.append(marks[-1].num_steps - before.num_steps)

            half = scenario.num_requests // 2
            phase_seconds = []

            async def one(request: dict, phase_start: float) -> None:
                nonlocal finished
                await asyncio.sleep(max(0.0, phase_start + request["arrival"] - time.perf_counter()))
                params = proto.SamplingParams(
                    temperature=0, max_tokens=request["max_tokens"], ignore_eos=True
                )
                add = proto.AddRequest(request["id"], proto.pack_i32(request["prompt"]), params)
                async for delta in engine.add_request(add):
                    counts[request["id"]] = counts.get(request["id"], 0) + len(delta.token_ids) // 4
                finished += 1
                if scenario.cut_to and finished == half:
                    # Another tenant takes most of the link: the executor sees it from its next step.
                    write_throttle(control, scenario.cut_to)
                    change()

            for index, phase in enumerate(scenario.phases):
                phase_start = time.perf_counter()
                if index:
                    change()
                tagged = [dict(request, id=f"p{index}-{request['id']}") for request in phase]
                await asyncio.gather(*(one(request, phase_start) for request in tagged))
                phase_seconds.append(round(time.perf_counter() - phase_start, 3))
            elapsed = time.perf_counter() - start
            stats = await engine.wait_idle()
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
    step_seconds = stats.step_seconds_total - before.step_seconds_total
    marks.append(stats)
    phase_stalls = [
        round(
            (end.stall_seconds_total - begin.stall_seconds_total)
            / max(end.step_seconds_total - begin.step_seconds_total, 1e-9),
            4,
        )
        for begin, end in zip(marks, marks[1:])
    ]
    run.result = dict(
        throughput=round(sum(counts.values()) / elapsed, 3),
        seconds=round(elapsed, 3),
        phase_seconds=phase_seconds,
        steps=stats.num_steps - before.num_steps,
        preemptions=stats.num_preemptions - before.num_preemptions,
        stall_fraction=round(
            (stats.stall_seconds_total - before.stall_seconds_total) / max(step_seconds, 1e-9), 4
        ),
        phase_stall_fractions=phase_stalls,
        host_block_bytes=kv_layout_for(config).block_bytes,
    )
    # Steps counted from the first after the warm-up, as the changes are.
    run.trace = [
        (t, lease, stall, step, reason, steps - before.num_steps)
        for t, lease, stall, step, reason, steps in trace
    ]
    return run


def write_throttle(path: Path, bytes_per_s: float | None) -> None:
    """Atomically, so the executor never reads half a number."""
    staged = path.with_suffix(".next")
    staged.write_text(f"{bytes_per_s}\n" if bytes_per_s else "")
    os.replace(staged, path)


def compare(
    model_dir: str,
    scenario: Scenario,
    device_blocks: int,
    pairs: int,
    workers: str,
    stall_target: float,
    stall_limit: float,
) -> dict:
    """Every ``fixed:N`` of the scenario's sweep, then ``pairs`` adaptive runs, each next to a run of
    the best N and of the best transparent N (the sweep's own for the first).

    Two static baselines: the best N (the highest throughput, whatever it stalled) and the best
    *transparent* N: the highest throughput among those that stalled at most ``stall_limit`` in
    every phase, the promise adaptive expansion is held to (Pie's "performance-transparent"
    swapping). Where stalls are cheap (a CPU, whose bigger batch gains more than its stalls cost)
    the first can be a lease that stalls a quarter of its time."""

    def once(keep_trace: bool = False, **expansion) -> Run:
        return run_scenario(
            model_dir,
            scenario,
            workers,
            keep_trace,
            device_kv_blocks=device_blocks,
            kv_policy="pie",
            **expansion,
        )

    def static(n: int) -> dict:
        return once(expansion=f"fixed:{n}").result

    fixed = {n: static(n) for n in scenario.sweep}
    best_n = max(fixed, key=lambda n: fixed[n]["throughput"])
    transparent = [n for n in fixed if max(fixed[n]["phase_stall_fractions"]) <= stall_limit]
    best_transparent = max(transparent, key=lambda n: fixed[n]["throughput"], default=None)
    host_gib = max(scenario.sweep) * fixed[best_n]["host_block_bytes"] / (1 << 30)
    adaptive_runs: list[Run] = []
    ratios, transparent_ratios = [], []
    for pair in range(pairs):
        if pair == 0:
            best, fair = fixed[best_n], fixed.get(best_transparent)
        else:
            best = static(best_n)
            fair = best if best_transparent in (best_n, None) else static(best_transparent)
        adaptive_runs.append(
            once(keep_trace=True, expansion="adaptive", host_kv_gib=host_gib, stall_target=stall_target)
        )
        ratios.append(adaptive_runs[-1].result["throughput"] / best["throughput"])
        if best_transparent is not None:
            transparent_ratios.append(adaptive_runs[-1].result["throughput"] / fair["throughput"])
    median = sorted(range(pairs), key=lambda pair: ratios[pair])[pairs // 2]
    adaptive = adaptive_runs[median]
    phases = phases_of(adaptive.trace, adaptive.changes, adaptive.result["phase_stall_fractions"])
    converged = [phase["steps_to_converge"] for phase in phases if phase["steps_to_converge"] is not None]
    # After a change: the phases that began with one (the first climbs from an empty lease).
    after_change = [
        phase["steps_to_converge"] for phase in phases[1:] if phase["steps_to_converge"] is not None
    ]
    return {
        "copy_throttle_bytes_per_s": scenario.throttle,
        "cut_to_bytes_per_s": scenario.cut_to,
        "fixed": {str(n): fixed[n] for n in fixed},
        "best_fixed_n": best_n,
        "best_transparent_fixed_n": best_transparent,
        "adaptive": adaptive.result,
        "ratios": [round(ratio, 3) for ratio in ratios],
        "throughput_ratio_adaptive_vs_best_fixed": round(ratios[median], 3),
        "transparent_ratios": [round(ratio, 3) for ratio in transparent_ratios],
        # The same pair's (the median of the first ratio), so both compare one adaptive run.
        "throughput_ratio_adaptive_vs_best_transparent_fixed": (
            round(transparent_ratios[median], 3) if transparent_ratios else None
        ),
        "phases": phases,
        "steps_to_converge": max(converged, default=None),  # the slowest phase
        **({"steps_to_converge_after_a_change": max(after_change)} if after_change else {}),
        "worst_phase_stall_fraction": max(phase["stall_fraction"] for phase in phases),
        "final_lease": phases[-1]["settled_lease"],
        "stall_fraction": adaptive.result["stall_fraction"],
        # The machine's load when the scenario ended: a shared CPU's timings are only comparable
        # at a similar load.
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "trace": adaptive.trace,
    }


def phases_of(trace: list, changes: list[int], stall_fractions: list[float]) -> list[dict]:
    """Per phase (from the start, then from each change): its first step, its stall fraction (the
    run's exact ``phase_stall_fractions``), the steps from its start until the lease settled, and
    the lease it settled on."""
    bounds = [0, *changes, None]
    phases = []
    for start, end, stall_fraction in zip(bounds, bounds[1:], stall_fractions):
        part = [row for row in trace if row[5] > start and (end is None or row[5] <= end)]
        settled_at, lease = steps_to_converge(part)
        phases.append(
            dict(
                first_step=start,
                stall_fraction=stall_fraction,
                steps_to_converge=max(0, settled_at - start) if part else None,
                settled_lease=lease,
            )
        )
    return phases


def steps_to_converge(trace: list, low: float = 0.8, high: float = 1.25) -> tuple[int, int]:
    """The step (of the first trace sample) from which the lease stays within ``low``-``high`` of
    where it ends up under demand (the release that returns host memory once the stream drains is
    not counted), and that lease. The band is the closed-loop tests' (0.8-1.25 of the limit, with
    the settled lease standing in for the limit no run can measure), widened to a block either way
    so that a lease of a few blocks is not "unsettled" by a one-block move."""
    end = len(trace)
    while end > 0 and trace[end - 1][4].startswith(("release", "hold: no demand")):
        end -= 1
    leases = [lease for _, lease, *_ in trace[: end or len(trace)]]
    final = leases[-1] if leases else 0
    lowest, highest = min(low * final, final - 1), max(high * final, final + 1)
    for sample in range(len(leases)):
        if all(lowest <= lease <= highest for lease in leases[sample:]):
            return trace[sample][5], final
    return trace[-1][5] if trace else 0, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--throttle",
        type=float,
        default=THROTTLED_LINK,
        help="bytes/s of the throttled scenarios' copy engine (CPU copy thread only)",
    )
    parser.add_argument("--pairs", type=int, default=5, help="adaptive / best-N pairs per scenario (median)")
    parser.add_argument(
        "--stall-target",
        type=float,
        default=EngineConfig.stall_target,
        help="the adaptive runs' --stall-target (default: the daemon's)",
    )
    parser.add_argument(
        "--stall-limit",
        type=float,
        default=0.02,
        help="the stall fraction a static N may reach in every phase to count as transparent",
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated, of " + ", ".join(SCENARIOS)
    )
    add_workers_arg(parser)
    args = parser.parse_args()
    one_torch_thread()
    names = [name for name in args.scenarios.split(",") if name]
    if torch.cuda.is_available():
        names = [name for name in names if name == "link"]  # the throttle is the CPU copy thread's
    model_dir, device_blocks, scenarios = scenarios_for(args.quick, args.throttle, names)
    results = {}
    for scenario in scenarios:
        result = compare(
            model_dir, scenario, device_blocks, args.pairs, args.workers, args.stall_target, args.stall_limit
        )
        results[scenario.name] = result
        # Progress on stderr: a long run on a loaded machine keeps what it measured if cut short.
        progress = {key: value for key, value in result.items() if key != "trace"}
        print(json.dumps({scenario.name: progress}), file=sys.stderr, flush=True)
    traces = {name: result.pop("trace") for name, result in results.items()}
    ratios = {name: result["throughput_ratio_adaptive_vs_best_fixed"] for name, result in results.items()}
    transparent = {
        name: result["throughput_ratio_adaptive_vs_best_transparent_fixed"]
        for name, result in results.items()
    }
    phases = [phase for result in results.values() for phase in result["phases"]]
    converge = [phase["steps_to_converge"] for phase in phases if phase["steps_to_converge"] is not None]
    emit(
        {
            "benchmark": "adaptive",
            "quick": args.quick,
            "workers": args.workers,
            "device_kv_blocks": device_blocks,
            "stall_target": args.stall_target,
            "stall_limit": args.stall_limit,
            "ratios": ratios,
            "worst_ratio": min(ratios.values()),
            "ratios_vs_best_transparent": transparent,
            "worst_phase_stall_fraction": max(phase["stall_fraction"] for phase in phases),
            "most_steps_to_converge": max(converge, default=None),
            "scenarios": results,
            "load_average": os.getloadavg(),
            "machine": machine(),
        }
    )
    if args.plot:
        plot(traces, results, args.plot)


def plot(traces: dict, results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(traces), figsize=(5 * len(traces), 5), sharex="col", squeeze=False)
    window = 16
    for column, (name, trace) in enumerate(traces.items()):
        top, bottom = axes[0][column], axes[1][column]
        steps = [row[5] for row in trace]
        top.plot(steps, [row[1] for row in trace], label="adaptive")
        top.axhline(results[name]["best_fixed_n"], color="gray", linestyle=":", label="best static N")
        fractions = []
        for i in range(len(trace)):
            part = trace[max(0, i - window) : i + 1]
            fractions.append(sum(row[2] for row in part) / max(sum(row[3] for row in part), 1e-9))
        bottom.plot(steps, fractions)
        for phase in results[name]["phases"][1:]:
            for axis in (top, bottom):
                axis.axvline(phase["first_step"], color="tab:red", alpha=0.5)
        top.set_title(name)
        top.set_ylabel("host lease (blocks)")
        top.legend()
        bottom.axhline(0.02, color="gray", linestyle="--")
        bottom.set_ylabel("stall fraction")
        bottom.set_xlabel("executor steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
