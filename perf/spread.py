"""Repeated benchmark runs summarised as median and spread, and figures judged against targets.

A benchmark prints one JSON object per run; after ``N`` runs every numeric leaf (nested dicts and
lists, addressed by a path of keys) becomes a :class:`Spread`: the median and the min–max range of
its values. Keys that only some runs have are summarised over the runs that have them, so a
script that gains a field does not break the report. A figure with a target is **met** only when
its whole range is on the right side of the target, **not met** when its whole range is on the
wrong side, and otherwise **not established**: the runs disagree (or there are fewer than
``MIN_RUNS`` of them), so the report must not claim it.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

Path = tuple[str, ...]
MET, NOT_MET, NOT_ESTABLISHED = "met", "not met", "not established"
MIN_RUNS = 3  # fewer runs than this have no spread worth the name: nothing is established


@dataclass(frozen=True)
class Spread:
    """The median and range of one figure over repeated runs."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread | None:
        data = sorted(float(value) for value in values if is_number(value))
        if not data:
            return None
        return cls(statistics.median(data), data[0], data[-1], len(data))

    def __str__(self) -> str:
        if self.low == self.high:
            return round_figure(self.median)
        return f"{round_figure(self.median)} ({round_figure(self.low)}–{round_figure(self.high)})"


@dataclass(frozen=True)
class Target:
    """``benchmark``'s figure at ``path`` (``*`` matches any key) should be ``>=`` or ``<=``
    ``value``; ``claim`` says in words what meeting it shows."""

    benchmark: str
    path: Path
    op: str
    value: float
    claim: str

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"a target's op is >= or <=, got {self.op!r}")

    def holds(self, value: float) -> bool:
        return value >= self.value if self.op == ">=" else value <= self.value

    def verdict(self, spread: Spread) -> str:
        if spread.count < MIN_RUNS:
            return NOT_ESTABLISHED
        low, high = self.holds(spread.low), self.holds(spread.high)
        if low and high:
            return MET
        if not low and not high:
            return NOT_MET
        return NOT_ESTABLISHED


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def leaves(result: Any, prefix: Path = ()) -> Iterator[tuple[Path, float]]:
    """Every finite numeric leaf of a JSON value with its path (list items by their index)."""
    if isinstance(result, dict):
        for key, value in result.items():
            yield from leaves(value, (*prefix, str(key)))
    elif isinstance(result, list):
        for index, value in enumerate(result):
            yield from leaves(value, (*prefix, str(index)))
    elif is_number(result):
        yield prefix, float(result)


def aggregate(runs: list[dict[str, Any]]) -> dict[Path, Spread]:
    """Median and range of every numeric leaf over ``runs`` (each one run's JSON object)."""
    values: dict[Path, list[float]] = {}
    for run in runs:
        for path, value in leaves(run):
            values.setdefault(path, []).append(value)
    return {path: spread for path, data in values.items() if (spread := Spread.of(data)) is not None}


def matching(spreads: dict[Path, Spread], pattern: Path) -> dict[Path, Spread]:
    """The spreads whose path matches ``pattern`` (``*`` matches one key), in natural order."""
    found = {
        path: spread
        for path, spread in spreads.items()
        if len(path) == len(pattern) and all(want in ("*", key) for want, key in zip(pattern, path))
    }
    return dict(sorted(found.items(), key=lambda item: [natural_key(key) for key in item[0]]))


def row_names(runs: list[dict[str, Any]], path: Path) -> list[str]:
    """The keys of the dicts at ``path`` across runs (union), in natural order."""
    names: set[str] = set()
    for run in runs:
        node: Any = run
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            names.update(str(key) for key in node)
    return sorted(names, key=natural_key)


def natural_key(text: str) -> tuple:
    """Sort numbers inside names by value: ``0 < 25 < 100`` and ``pie_fixed_48 < pie_fixed_192``."""
    return tuple((0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part)
                 for part in re.split(r"(\d+(?:\.\d+)?)", text) if part)  # fmt: skip


def round_figure(value: float, digits: int = 3) -> str:
    """Three significant figures, without exponent notation or trailing noise: 255.5606 -> "256",
    2.759 -> "2.76", 0.070123 -> "0.0701", 12345.6 -> "12346", 0.0 -> "0"."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    text = f"{round(value, decimals):.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def judge(
    targets: list[Target], spreads: dict[str, dict[Path, Spread]]
) -> list[tuple[Target, Path, Spread, str]]:
    """Each target against each figure it matches: ``(target, path, spread, verdict)``."""
    verdicts = []
    for target in targets:
        for path, spread in matching(spreads.get(target.benchmark, {}), target.path).items():
            verdicts.append((target, path, spread, target.verdict(spread)))
    return verdicts
