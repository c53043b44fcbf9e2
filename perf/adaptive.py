"""Adaptive expansion vs the best static lease, on the pooling workload. Sweeps ``fixed:N`` to find
the best N, then runs ``adaptive`` (no tuning by hand, the sweep's largest N as its host budget) on
the same request stream. Two scenarios: the machine's own link, and (CPU) a copy engine throttled
so that the largest static lease stalls. Prints one JSON line: the first scenario's
``throughput_ratio_adaptive_vs_best_fixed``, ``steps_to_converge``, ``stall_fraction`` at the top,
``worst_ratio`` / ``worst_stall_fraction`` over both, every run under ``scenarios``; with --plot, a
PNG of the lease and the stall fraction over time.

    python perf/adaptive.py [--quick] [--workers processes|threads] [--plot docs/adaptive.png]

Through the engine as production runs it (worker processes; ``--workers threads`` as an option):
the controller is fed by the executor's step spans over ZeroMQ, as in the daemon. A trace is
sampled from the frontend's Stats snapshots, so ``steps_to_converge`` counts executor steps up to
the first sample from which the lease stays settled.
"""

from __future__ import annotations

import argparse

import torch
from common import add_workers_arg, emit, machine, one_torch_thread
from pooling import run, workload_model


def steps_to_converge(trace: list, tolerance: float = 0.1) -> tuple[int, int]:
    """The step (of the first trace sample) from which the lease stays within ``tolerance`` of where
    it ends up under demand (the release that returns host memory once the stream drains is not
    counted), and that lease."""
    end = len(trace)
    while end > 0 and trace[end - 1][4].startswith(("release", "hold: no demand")):
        end -= 1
    leases = [lease for _, lease, *_ in trace[: end or len(trace)]]
    final = leases[-1] if leases else 0
    band = max(1.0, tolerance * final)
    for sample in range(len(leases)):
        if all(abs(lease - final) <= band for lease in leases[sample:]):
            return trace[sample][5], final
    return trace[-1][5] if trace else 0, final


def compare(
    model_dir: str,
    requests,
    device_blocks: int,
    sweep: list[int],
    throttle: float | None,
    pairs: int,
    workers: str,
) -> dict:
    """Every ``fixed:N`` of ``sweep``, then ``adaptive`` with the largest N's host memory as its
    budget (so it may choose anything a static run could), on the same request stream. The ratio
    is the median over ``pairs`` adaptive runs, each against a best-N run next to it in time (the
    sweep's own for the first), so a noisy moment of a shared machine does not decide it."""
    common: dict = dict(device_kv_blocks=device_blocks, kv_policy="pie")
    if throttle:
        common["extra"] = {"copy_throttle_bytes_per_s": throttle}

    def once(**overrides) -> dict:
        return run(model_dir, requests, 16, workers, **common, **overrides)

    fixed = {n: once(expansion=f"fixed:{n}") for n in sweep}
    best_n = max(fixed, key=lambda n: fixed[n]["throughput"])
    host_gib = max(sweep) * fixed[best_n]["host_block_bytes"] / (1 << 30)
    adaptive_runs, ratios = [], []
    for pair in range(pairs):
        best = fixed[best_n] if pair == 0 else once(expansion=f"fixed:{best_n}")
        adaptive_runs.append(once(keep_trace=True, expansion="adaptive", host_kv_gib=host_gib))
        ratios.append(adaptive_runs[-1]["throughput"] / best["throughput"])
    traces = [adaptive.pop("trace") for adaptive in adaptive_runs]
    median = sorted(range(pairs), key=lambda pair: ratios[pair])[pairs // 2]
    trace = traces[median]
    converged_at, settled_lease = steps_to_converge(trace)
    return {
        "copy_throttle_bytes_per_s": throttle,
        "fixed": {str(n): fixed[n] for n in fixed},
        "best_fixed_n": best_n,
        "adaptive": adaptive_runs[median],
        "ratios": [round(ratio, 3) for ratio in ratios],
        "throughput_ratio_adaptive_vs_best_fixed": round(ratios[median], 3),
        "steps_to_converge": converged_at,
        "final_lease": settled_lease,
        "stall_fraction": adaptive_runs[median]["stall_fraction"],
        "trace": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--throttle",
        type=float,
        default=THROTTLED_LINK,
        help="bytes/s of the second scenario's copy engine (CPU copy thread only; 0: skip it)",
    )
    parser.add_argument("--pairs", type=int, default=5, help="adaptive / best-N pairs per scenario (median)")
    add_workers_arg(parser)
    args = parser.parse_args()
    one_torch_thread()
    model_dir, requests, device_blocks, fixed_ns = workload_model(args.quick)
    sweep = [*fixed_ns, 2 * max(fixed_ns)]  # up to where more host memory stops paying
    scenarios = {"link": compare(model_dir, requests, device_blocks, sweep, None, args.pairs, args.workers)}
    if args.throttle and not torch.cuda.is_available():
        scenarios["throttled_link"] = compare(
            model_dir, requests, device_blocks, sweep, args.throttle, args.pairs, args.workers
        )
    traces = {name: scenario.pop("trace") for name, scenario in scenarios.items()}
    headline = scenarios["link"]
    result = {
        "benchmark": "adaptive",
        "quick": args.quick,
        "workers": args.workers,
        "device_kv_blocks": device_blocks,
        **{key: headline[key] for key in HEADLINE},
        "worst_ratio": min(s["throughput_ratio_adaptive_vs_best_fixed"] for s in scenarios.values()),
        "worst_stall_fraction": max(s["stall_fraction"] for s in scenarios.values()),
        "scenarios": scenarios,
        "machine": machine(),
    }
    emit(result)
    if args.plot:
        plot(traces, args.plot)


HEADLINE = ("throughput_ratio_adaptive_vs_best_fixed", "steps_to_converge", "stall_fraction", "best_fixed_n")
# The second scenario's link: slow enough that the largest static lease stalls on it, so the best
# static N is inside the sweep and adaptive has to find it rather than take everything.
THROTTLED_LINK = 0.25e9


def plot(traces: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    window = 16
    for name, trace in traces.items():
        times = [t for t, *_ in trace]
        top.plot(times, [lease for _, lease, *_ in trace], label=name)
        fractions = []
        for i in range(len(trace)):
            part = trace[max(0, i - window) : i + 1]
            fractions.append(sum(step[2] for step in part) / max(sum(step[3] for step in part), 1e-9))
        bottom.plot(times, fractions, label=name)
    top.set_ylabel("host lease (blocks)")
    top.legend()
    bottom.axhline(0.02, color="gray", linestyle="--", label="target")
    bottom.set_ylabel("stall fraction")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
