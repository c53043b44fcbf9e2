"""Adaptive expansion vs the best static lease, on the pooling workload. Sweeps ``fixed:N`` to find
the best N, then runs ``adaptive`` (no tuning by hand) on the same request stream. Prints one JSON
line: ``throughput_ratio_adaptive_vs_best_fixed``, ``steps_to_converge``, ``stall_fraction``;
with --plot, a PNG of the lease and the stall fraction over time.

    python perf/adaptive.py [--quick] [--plot docs/adaptive.png]
"""

from __future__ import annotations

import argparse

import torch
from common import emit, machine
from pooling import run, workload_model


def steps_to_converge(leases: list[int], tolerance: float = 0.1) -> int:
    """The first step from which the lease stays within ``tolerance`` of where it ends up."""
    final = leases[-1] if leases else 0
    band = max(1.0, tolerance * final)
    for step in range(len(leases)):
        if all(abs(lease - final) <= band for lease in leases[step:]):
            return step
    return len(leases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as perf/pooling.py
    model_dir, requests, device_blocks, fixed_ns = workload_model(args.quick)
    block_size = 16
    common = dict(device_kv_blocks=device_blocks, kv_policy="pie")
    fixed = {n: run(model_dir, requests, block_size, expansion=f"fixed:{n}", **common) for n in fixed_ns}
    best_n = max(fixed, key=lambda n: fixed[n]["throughput"])
    host_gib = 2 * max(fixed_ns) * fixed[best_n]["host_block_bytes"] / (1 << 30)
    adaptive = run(
        model_dir, requests, block_size, keep_trace=True, expansion="adaptive", host_kv_gib=host_gib, **common
    )
    trace = adaptive.pop("trace")
    leases = [lease for _, lease, _, _ in trace]
    result = {
        "benchmark": "adaptive",
        "quick": args.quick,
        "device_kv_blocks": device_blocks,
        "fixed": {str(n): fixed[n] for n in fixed},
        "best_fixed_n": best_n,
        "adaptive": adaptive,
        "throughput_ratio_adaptive_vs_best_fixed": round(
            adaptive["throughput"] / fixed[best_n]["throughput"], 3
        ),
        "steps_to_converge": steps_to_converge(leases),
        "final_lease": leases[-1] if leases else 0,
        "stall_fraction": adaptive["stall_fraction"],
        "machine": machine(),
    }
    emit(result)
    if args.plot:
        plot(trace, args.plot)


def plot(trace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [t for t, _, _, _ in trace]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(times, [lease for _, lease, _, _ in trace])
    top.set_ylabel("host lease (blocks)")
    window = 16
    fractions = []
    for i in range(len(trace)):
        part = trace[max(0, i - window) : i + 1]
        fractions.append(sum(s for _, _, s, _ in part) / max(sum(d for _, _, _, d in part), 1e-9))
    bottom.plot(times, fractions, color="tab:red")
    bottom.axhline(0.02, color="gray", linestyle="--", label="target")
    bottom.set_ylabel("stall fraction")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
