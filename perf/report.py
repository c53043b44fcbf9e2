"""Run the benchmark suite several times, interleaved, and write docs/benchmarks.md with every
figure as median and spread, its verdict against its target, and plots with error bars.

    python perf/report.py [--out docs] [--repeats 3] [--only pooling,prefix]
    python perf/report.py --from-json docs/benchmarks.json   # re-render saved runs, run nothing

Each benchmark runs as its own process and prints one JSON line. Runs are interleaved (round 1:
A, B, C ...; round 2: A, B, C ...) so a slow spell of a shared machine lands on every benchmark
rather than on all repeats of one. Figures are reported as ``median (min–max)`` over the rounds
(see ``spread.py``); a figure whose range crosses its target is "not established", never "met".
The raw runs, the machine and the commit are saved to ``benchmarks.json`` next to the report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spread import MET, MIN_RUNS, NOT_ESTABLISHED, Spread, Target, aggregate, judge, round_figure, row_names

PERF = Path(__file__).resolve().parent
ROOT = PERF.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages come from the checkout
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Job:
    name: str
    script: str
    args: tuple[str, ...] = ()


JOBS = (
    Job("pooling", "pooling.py", ("--quick",)),
    Job("adaptive", "adaptive.py", ("--quick", "--pairs", "1")),
    Job("prefix", "prefix.py", ("--quick",)),
    Job("transparency", "transparency.py", ("--quick",)),
    Job("serving", "serving.py", ("--quick",)),
    Job("engine_throughput", "engine_throughput.py", ("--num-prompts", "8", "--max-tokens", "32")),
)


@dataclass(frozen=True)
class Table:
    """One section's table: a row per key of the dict at ``rows`` (natural order; ``()`` for one
    row of the benchmark's top-level figures) and a column per ``(header, key)``."""

    benchmark: str
    title: str
    row_header: str
    rows: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]


TABLES = (
    Table("pooling", "Pooling (`perf/pooling.py --quick`)", "run", ("runs",), (
        ("tok/s", "throughput"), ("TTFT p50 s", "ttft_p50"), ("TTFT p99 s", "ttft_p99"),
        ("TPOT p50 s", "tpot_p50"), ("e2e mean s", "e2e_mean"), ("preemptions", "preemptions"),
        ("device budget (blocks)", "device_budget_blocks"), ("staging ring (blocks)", "staging_blocks"),
    )),
    Table("adaptive", "Adaptive expansion (`perf/adaptive.py --quick`)", "link", ("scenarios",), (
        ("best fixed N", "best_fixed_n"), ("adaptive / best fixed", "throughput_ratio_adaptive_vs_best_fixed"),
        ("best transparent N", "best_transparent_fixed_n"),
        ("adaptive / best transparent", "throughput_ratio_adaptive_vs_best_transparent_fixed"),
        ("steps to converge", "steps_to_converge"),
        ("steps to converge after a change", "steps_to_converge_after_a_change"), ("final lease", "final_lease"),
        ("stall fraction", "stall_fraction"), ("worst phase's stall fraction", "worst_phase_stall_fraction"),
    )),
    Table("prefix", "Prefix caching (`perf/prefix.py --quick`)", "cache", ("runs",), (
        ("tok/s", "throughput"), ("TTFT p50 s", "ttft_p50"), ("TTFT p99 s", "ttft_p99"),
        ("computed tokens", "computed_tokens"), ("host hit tokens", "host_hit_tokens"),
    )),
    Table("transparency", "Transparency (`perf/transparency.py --quick`)", "host %", ("results",), (
        ("step ms", "step_ms"), ("step-time ratio", "step_time_ratio"), ("stall fraction", "stall_fraction"),
        ("copy efficiency", "copy_efficiency"),
    )),
    Table("serving", "Through `pied serve`, measured by `pied bench serve` (`perf/serving.py --quick`): pooling",
          "config", ("workloads", "pooling", "runs"), (
        ("output tok/s", "output_throughput"), ("TTFT p50 ms", "median_ttft_ms"), ("TTFT p99 ms", "p99_ttft_ms"),
        ("TPOT p50 ms", "median_tpot_ms"), ("e2e mean ms", "mean_e2el_ms"), ("preemptions", "preemptions"),
    )),
    Table("serving", "Through `pied serve`: adaptive expansion on a throttled link", "config",
          ("workloads", "adaptive", "runs"), (
        ("output tok/s", "output_throughput"), ("TTFT p50 ms", "median_ttft_ms"), ("TPOT p50 ms", "median_tpot_ms"),
        ("preemptions", "preemptions"),
    )),
    Table("serving", "Through `pied serve`: prefix caching", "cache", ("workloads", "prefix", "runs"), (
        ("output tok/s", "output_throughput"), ("TTFT p50 ms", "median_ttft_ms"), ("TTFT p99 ms", "p99_ttft_ms"),
        ("prefix hit tokens", "prefix_hit_tokens"),
    )),
    Table("engine_throughput", "Against transformers (`perf/engine_throughput.py`)", "", (), (
        ("pied tok/s", "pied_tokens_per_s"), ("transformers tok/s", "transformers_tokens_per_s"),
        ("pied / transformers", "ratio_pied_vs_transformers"),
    )),
)  # fmt: skip

TARGETS = [
    Target("pooling", ("throughput_ratio_pie_vs_none",), ">=", 1.1, "pooling raises throughput at one device budget"),
    Target("pooling", ("latency_ratio_none_vs_pie",), ">=", 1.1, "pooling lowers mean latency"),
    Target("pooling", ("device_memory_ratio_at_equal_throughput",), ">=", 1.1, "pooling saves device memory"),
    Target("pooling", ("throughput_ratio_pie_vs_none_at_equal_device_memory",), ">=", 1.5,
           "pooling raises throughput at equal total device memory (device blocks + staging ring)"),
    Target("adaptive", ("scenarios", "link", "throughput_ratio_adaptive_vs_best_fixed"), ">=", 0.95,
           "on a steady workload, adaptive expansion within 5% of the best fixed lease"),
    Target("adaptive", ("scenarios", "throttled_link", "throughput_ratio_adaptive_vs_best_fixed"), ">=", 0.95,
           "on a steady workload and a throttled link, adaptive expansion within 5% of the best fixed lease"),
    # "Transparent": a static lease that stalled at most 2% in every phase (perf/adaptive.py --stall-limit),
    # the promise adaptive expansion itself is held to below.
    Target("adaptive", ("scenarios", "short_long", "throughput_ratio_adaptive_vs_best_transparent_fixed"), ">=",
           1.1, "where the best lease changes mid-run (short -> long), adaptive beats every transparent static lease"),
    Target("adaptive", ("scenarios", "throttle_cut", "throughput_ratio_adaptive_vs_best_transparent_fixed"), ">=",
           1.1, "where the best lease changes mid-run (link cut to 1/4), adaptive beats every transparent static lease"),
    Target("adaptive", ("scenarios", "*", "worst_phase_stall_fraction"), "<=", 0.02, "stalls at most 2% in every phase"),
    Target("adaptive", ("scenarios", "*", "steps_to_converge_after_a_change"), "<=", 50,
           "the lease settles within 50 steps of a change"),
    Target("transparency", ("results", "*", "step_time_ratio"), "<=", 1.05,
           "host-resident KV costs under 5% step time"),
    Target("prefix", ("ttft_p50_ratio_off_vs_host",), ">=", 1.1, "the two-tier prefix cache lowers TTFT"),
    Target("serving", ("workloads", "pooling", "throughput_ratio_pie_fixed_vs_none"), ">=", 1.1,
           "through the daemon, pooling raises throughput at one device budget"),
    Target("serving", ("workloads", "adaptive", "throughput_ratio_adaptive_vs_best_fixed"), ">=", 0.95,
           "through the daemon, adaptive expansion within 5% of the best fixed lease"),
    Target("serving", ("workloads", "prefix", "ttft_p50_ratio_off_vs_host"), ">=", 1.1,
           "through the daemon, the two-tier prefix cache lowers TTFT"),
    Target("engine_throughput", ("ratio_pied_vs_transformers",), ">=", 0.95, "pied at least on par with transformers"),
]  # fmt: skip


def run(job: Job) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(PERF / job.script), *job.args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{job.script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def run_interleaved(
    jobs: list[Job], repeats: int, on_result: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """``repeats`` rounds, each running every job once in order (A, B, A, B ...); ``on_result``
    sees the runs so far after each one (the report saves them, so a killed report keeps them)."""
    from workers.progress import Progress

    runs: dict[str, list[dict[str, Any]]] = {job.name: [] for job in jobs}
    with Progress(repeats * len(jobs), "benchmarks") as progress:
        for _ in range(repeats):
            for job in jobs:
                runs[job.name].append(run(job))
                if on_result is not None:
                    on_result(runs)
                progress.update()
    return runs


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (
        " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    )


# ---------------------------------------------------------------- rendering


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cell(spreads: dict[tuple[str, ...], Spread], path: tuple[str, ...]) -> str:
    spread = spreads.get(path)
    return "—" if spread is None else str(spread)


def render_table(table: Table, runs: list[dict[str, Any]]) -> str:
    spreads = aggregate(runs)
    names = row_names(runs, table.rows) if table.rows else [""]
    rows = [
        ([name] if table.rows else []) + [cell(spreads, (*table.rows, name, key) if table.rows else (key,))
                                          for _, key in table.columns]
        for name in names
    ]  # fmt: skip
    header = ([table.row_header] if table.rows else []) + [header for header, _ in table.columns]
    return markdown_table(header, rows)


def render_verdicts(runs: dict[str, list[dict[str, Any]]]) -> str:
    spreads = {name: aggregate(results) for name, results in runs.items()}
    rows = []
    for target, path, spread, verdict in judge(TARGETS, spreads):
        shown = f"**{verdict}**" if verdict == MET else verdict
        rows.append([f"{target.benchmark}: `{'.'.join(path)}`", str(spread),
                     f"{target.op} {round_figure(target.value)}", shown, target.claim])  # fmt: skip
    return markdown_table(["figure", "median (min–max)", "target", "verdict", "claim"], rows)


def render(document: dict[str, Any], plots: list[str]) -> str:
    runs = document["runs"]
    repeats = {name: len(results) for name, results in runs.items()}
    sections = [
        "# Benchmarks",
        f"Generated by `python perf/report.py --repeats {document['repeats']}` at commit "
        f"`{document['commit']}` on {json.dumps(document['machine'])}. Every benchmark ran "
        f"{', '.join(f'{name} {count}x' for name, count in repeats.items())}, interleaved with the others"
        f"{' (the report stopped early: fewer runs than asked)' if min(repeats.values(), default=0) < document['repeats'] else ''}; "
        "each figure is the median over those runs with the range (min–max) in parentheses, three "
        "significant figures. Ratios are measured side by side within each run; absolute times hold "
        "only for this machine.",
        "## Figures against their targets",
        f"A figure is *{MET}* only when its whole range over at least {MIN_RUNS} runs is on the target's "
        f"side, *{NOT_ESTABLISHED}* when the range crosses the target (the runs disagree) or there are "
        f"fewer than {MIN_RUNS} runs.",
        render_verdicts(runs),
    ]
    for table in TABLES:
        if table.benchmark not in runs:
            continue
        sections += [f"## {table.title}", render_table(table, runs[table.benchmark])]
        if f"{table.benchmark}.png" in plots:
            sections.append(f"![{table.benchmark}]({table.benchmark}.png)")
    return "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------- plots


def error_bars(spreads: list[Spread | None]) -> tuple[list[float], list[list[float]]]:
    medians = [s.median if s else float("nan") for s in spreads]
    below = [s.median - s.low if s else 0.0 for s in spreads]
    above = [s.high - s.median if s else 0.0 for s in spreads]
    return medians, [below, above]


def plot_all(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    """One PNG per benchmark that has a plotted figure (median, min–max error bars); the file names."""
    try:
        import matplotlib
    except ImportError:  # the report is still complete without pictures
        print(
            "perf/report.py: matplotlib is not installed (pip install pied[perf]); no plots", file=sys.stderr
        )
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = {  # benchmark -> (rows path, figure key, y label, target)
        "pooling": (("runs",), "throughput", "generated tokens/s", None),
        "adaptive": (
            ("scenarios",),
            "throughput_ratio_adaptive_vs_best_fixed",
            "adaptive / best fixed N",
            0.95,
        ),
        "prefix": (("runs",), "ttft_p50", "TTFT p50 (s)", None),
        "transparency": (("results",), "step_time_ratio", "step time / device-only", 1.05),
    }
    written = []
    for name, (rows, key, label, target) in plotted.items():
        if name not in runs:
            continue
        spreads = aggregate(runs[name])
        names = row_names(runs[name], rows)
        medians, yerr = error_bars([spreads.get((*rows, row, key)) for row in names])
        fig, axis = plt.subplots(figsize=(6, 3.6))
        if name == "transparency":
            axis.errorbar([float(n) for n in names], medians, yerr=yerr, fmt="o-", capsize=4)
            axis.set_xlabel("% of KV blocks on host")
        else:
            axis.bar(names, medians, yerr=yerr, capsize=4, color="tab:blue")
            axis.tick_params(axis="x", rotation=20)
        if target is not None:
            axis.axhline(target, color="tab:red", linestyle="--", label=f"target {target}")
            axis.legend()
        axis.set_ylabel(label)
        axis.set_title(f"{name}: median of {len(runs[name])} runs, bars min–max")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(f"{name}.png")
    return written


def load_document(path: Path) -> dict[str, Any]:
    """A saved ``benchmarks.json``; the older one-run-per-benchmark shape (``{name: result}``) too."""
    document = json.loads(path.read_text())
    if "runs" in document:
        return document
    some = next(iter(document.values()), {})
    return {
        "machine": some.get("machine", {}),
        "commit": "unknown",
        "repeats": 1,
        "runs": {name: [result] for name, result in document.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (at least 1)")
    parser.add_argument(
        "--only", default=None, help="comma list of benchmarks: " + ",".join(j.name for j in JOBS)
    )
    parser.add_argument("--from-json", default=None, help="render saved runs (a benchmarks.json) instead")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        document = load_document(Path(args.from_json))
    else:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        jobs = list(JOBS)
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {job.name for job in jobs}
            if unknown:
                parser.error(f"--only: unknown benchmarks {sorted(unknown)}")
            jobs = [job for job in jobs if job.name in wanted]
        from common import machine

        document = {"machine": machine(), "commit": commit(), "repeats": args.repeats, "runs": {}}

        def save(runs: dict[str, list[dict[str, Any]]]) -> None:
            document["runs"] = runs
            (out / "benchmarks.json").write_text(json.dumps(document, indent=1, sort_keys=True))

        save(run_interleaved(jobs, args.repeats, on_result=save))
    plots = plot_all(document["runs"], out)
    (out / "benchmarks.md").write_text(render(document, plots))
    print(json.dumps({"report": str(out / "benchmarks.md"), "plots": plots}))


if __name__ == "__main__":
    main()
