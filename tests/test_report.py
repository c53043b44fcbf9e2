"""perf/report.py's aggregation on canned benchmark JSON: medians and ranges over repeated runs,
rounding, natural row order, verdicts that refuse to call a crossing range "met", robustness to
keys that come and go, interleaved run order, and the rendered report from saved runs (real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from server import REPO

sys.path.insert(0, str(REPO / "perf"))

import report  # noqa: E402
from spread import MET, NOT_ESTABLISHED, NOT_MET, Spread, Target, aggregate, judge, round_figure, row_names  # noqa: E402

# Three runs of a pooling-like benchmark, as the script prints them (one JSON line each).
POOLING_LINES = [
    '{"benchmark": "pooling", "throughput_ratio_pie_vs_none": 1.99, "latency_ratio_none_vs_pie": 2.1, '
    '"quick": true, "runs": {"none": {"throughput": 92.6372, "preemptions": 18}, '
    '"pie_fixed_192": {"throughput": 255.5606, "preemptions": 5}, "pie_fixed_48": {"throughput": 148.1198}}}',
    '{"benchmark": "pooling", "throughput_ratio_pie_vs_none": 2.76, "latency_ratio_none_vs_pie": 2.4, '
    '"quick": true, "runs": {"none": {"throughput": 80.0, "preemptions": 17}, '
    '"pie_fixed_192": {"throughput": 221.0, "preemptions": 5}, "pie_fixed_48": {"throughput": 150.0}}, '
    '"new_field": {"extra": 7}}',
    '{"benchmark": "pooling", "throughput_ratio_pie_vs_none": 0.9, "latency_ratio_none_vs_pie": 2.2, '
    '"quick": true, "runs": {"none": {"throughput": 101.0, "preemptions": null}, '
    '"pie_fixed_192": {"throughput": 230.0, "preemptions": 6}, "pie_fixed_48": {"throughput": 149.0}, '
    '"pie_fixed_96": {"throughput": 170.0}}}',
]
TRANSPARENCY_LINES = [
    json.dumps(
        {"results": {str(pct): {"step_time_ratio": ratio} for pct, ratio in zip((0, 100, 25), ratios)}}
    )
    for ratios in ((1.0, 0.98, 1.01), (1.0, 1.2, 1.02), (1.0, 1.1, 1.0))
]


def runs_of(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


def test_spread_is_median_and_range_of_numbers_only() -> None:
    spread = Spread.of([3, 1.5, 2, None, True, float("nan"), "x"])
    assert spread == Spread(median=2.0, low=1.5, high=3.0, count=3)
    assert Spread.of([None, "x"]) is None
    assert Spread.of([4, 1, 3, 2]).median == 2.5


@pytest.mark.parametrize(
    "value, text",
    [(255.5606, "256"), (2.759, "2.76"), (0.070123, "0.0701"), (12345.6, "12346"), (0.0, "0"), (18.0, "18"),
     (1.0, "1"), (0.0069, "0.0069"), (-1.234, "-1.23"), (99.96, "100")],
)  # fmt: skip
def test_round_figure(value: float, text: str) -> None:
    assert round_figure(value) == text


def test_aggregate_over_runs_with_keys_that_come_and_go() -> None:
    spreads = aggregate(runs_of(POOLING_LINES))
    ratio = spreads[("throughput_ratio_pie_vs_none",)]
    assert (ratio.median, ratio.low, ratio.high, ratio.count) == (1.99, 0.9, 2.76, 3)
    assert spreads[("runs", "none", "preemptions")] == Spread(17.5, 17.0, 18.0, 2)  # null is not a value
    assert spreads[("runs", "pie_fixed_96", "throughput")].count == 1  # only the last run had it
    assert spreads[("new_field", "extra")].count == 1
    assert ("quick",) not in spreads and ("benchmark",) not in spreads  # booleans and strings are not figures
    assert str(spreads[("runs", "none", "throughput")]) == "92.6 (80–101)"
    assert str(spreads[("runs", "pie_fixed_48", "throughput")]) == "149 (148–150)"


def test_rows_in_natural_order() -> None:
    assert row_names(runs_of(POOLING_LINES), ("runs",)) == [
        "none",
        "pie_fixed_48",
        "pie_fixed_96",
        "pie_fixed_192",
    ]
    assert row_names(runs_of(TRANSPARENCY_LINES), ("results",)) == ["0", "25", "100"]
    assert row_names(runs_of(POOLING_LINES), ("missing",)) == []


def test_verdicts_never_call_a_crossing_range_met() -> None:
    at_least = Target("b", ("x",), ">=", 1.1, "")
    assert at_least.verdict(Spread(2.0, 1.5, 2.5, 3)) == MET
    assert at_least.verdict(Spread(1.0, 0.8, 1.05, 5)) == NOT_MET
    assert (
        at_least.verdict(Spread(1.99, 0.9, 2.76, 3)) == NOT_ESTABLISHED
    )  # median meets it; the range does not
    assert at_least.verdict(Spread(2.0, 2.0, 2.0, 1)) == NOT_ESTABLISHED  # one run establishes nothing
    at_most = Target("b", ("x",), "<=", 1.05, "")
    assert at_most.verdict(Spread(1.0, 0.98, 1.05, 3)) == MET  # the bound itself meets it
    with pytest.raises(ValueError, match=">= or <="):
        Target("b", ("x",), "<", 1.0, "")


def test_wildcard_targets_judge_every_row_in_order() -> None:
    spreads = {"transparency": aggregate(runs_of(TRANSPARENCY_LINES))}
    target = Target("transparency", ("results", "*", "step_time_ratio"), "<=", 1.05, "")
    verdicts = [(path[1], verdict) for _, path, _, verdict in judge([target], spreads)]
    assert verdicts == [("0", MET), ("25", MET), ("100", NOT_ESTABLISHED)]
    assert judge([Target("absent", ("x",), ">=", 1, "")], spreads) == []


def test_render_tables_and_verdicts(tmp_path: Path) -> None:
    document = {
        "machine": {"device": "cpu", "cpus": 2},
        "commit": "abc1234",
        "repeats": 3,
        "runs": {"pooling": runs_of(POOLING_LINES), "transparency": runs_of(TRANSPARENCY_LINES)},
    }
    text = report.render(document, plots=["pooling.png"])
    assert "`abc1234`" in text and '"device": "cpu"' in text
    lines = text.splitlines()
    ratio_row = next(line for line in lines if "`throughput_ratio_pie_vs_none`" in line)
    assert "1.99 (0.9–2.76)" in ratio_row and NOT_ESTABLISHED in ratio_row and "**met**" not in ratio_row
    latency_row = next(line for line in lines if "`latency_ratio_none_vs_pie`" in line)
    assert "**met**" in latency_row
    pooling_rows = [
        line.split(" | ")[0].strip("| ")
        for line in lines
        if line.startswith("| none") or line.startswith("| pie")
    ]
    assert pooling_rows == ["none", "pie_fixed_48", "pie_fixed_96", "pie_fixed_192"]
    none_row = next(line for line in lines if line.startswith("| none"))
    assert "| 92.6 (80–101) |" in none_row and "17.5 (17–18)" in none_row
    fixed_96 = next(line for line in lines if line.startswith("| pie_fixed_96"))
    assert "| 170 |" in fixed_96 and "—" in fixed_96  # one run, no range; missing columns shown as —
    assert "![pooling](pooling.png)" in text and "![transparency]" not in text
    assert "Adaptive" not in text  # benchmarks that did not run are left out, not crashed on
    assert "stopped early" not in text
    assert "stopped early" in report.render({**document, "repeats": 4}, plots=[])


def test_runs_are_interleaved(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    def fake_run(job: report.Job) -> dict:
        order.append(job.name)
        return {"n": len(order)}

    monkeypatch.setattr(report, "run", fake_run)
    jobs = [report.Job("a", "a.py"), report.Job("b", "b.py")]
    saved: list[int] = []
    runs = report.run_interleaved(
        jobs, repeats=3, on_result=lambda runs: saved.append(sum(map(len, runs.values())))
    )
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert runs == {"a": [{"n": 1}, {"n": 3}, {"n": 5}], "b": [{"n": 2}, {"n": 4}, {"n": 6}]}
    assert saved == [1, 2, 3, 4, 5, 6]  # the runs so far, after every run


def test_run_reads_the_last_json_line_and_reports_failures(tmp_path: Path) -> None:
    script = tmp_path / "fake_bench.py"
    script.write_text('print("warming up")\nprint(\'{"throughput": 12.5, "runs": {"a": {"x": 1}}}\')\n')
    result = report.run(report.Job("fake", str(script)))
    assert result["throughput"] == 12.5 and result["runs"] == {"a": {"x": 1}} and result["wall_seconds"] >= 0
    failing = tmp_path / "failing_bench.py"
    failing.write_text('import sys\nsys.exit("out of memory")\n')
    with pytest.raises(RuntimeError, match="out of memory"):
        report.run(report.Job("failing", str(failing)))


@pytest.mark.e2e
def test_cli_renders_saved_runs(tmp_path: Path) -> None:
    saved = tmp_path / "benchmarks.json"
    saved.write_text(
        json.dumps(
            {
                "machine": {"device": "cpu"},
                "commit": "abc1234",
                "repeats": 3,
                "runs": {"pooling": runs_of(POOLING_LINES), "transparency": runs_of(TRANSPARENCY_LINES)},
            }
        )
    )
    out = tmp_path / "docs"
    done = subprocess.run(
        [sys.executable, str(REPO / "perf" / "report.py"), "--from-json", str(saved), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    text = (out / "benchmarks.md").read_text()
    assert "## Pooling" in text and "## Transparency" in text and NOT_ESTABLISHED in text
    pytest.importorskip("matplotlib")
    assert summary["plots"] == ["pooling.png", "transparency.png"]
    assert (out / "pooling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
