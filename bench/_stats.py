"""Samples, percentiles, alternation, and the rows the report is made of.

Every row compares a subject (Custos) with its baseline measured in the same
run. Runs alternate (A B A B ...: ``alternate``) so that slow drift of a
shared machine spreads over both. A row reports medians, the 95th percentile
of the bad tail (for a rate, the 5th percentile: the slowest 5 %), and the
ratio of the subject's median to the baseline's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")

TargetKind = Literal[
    "ratio_at_most", "ratio_at_least", "subject_at_least", "subject_p99_below", "difference_at_most"
]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    value: float

    def describe(self, unit: str) -> str:
        return {
            "ratio_at_most": f"ratio ≤ {self.value:g}",
            "ratio_at_least": f"ratio ≥ {self.value:g}",
            "subject_at_least": f"≥ {self.value:g} {unit}",
            "subject_p99_below": f"p99 < {self.value:g} {unit}",
            "difference_at_most": f"adds ≤ {self.value:g} {unit}",
        }[self.kind]


@dataclass
class Row:
    scenario: str
    measure: str
    unit: str
    higher_is_better: bool
    baseline: str
    subject: str
    baseline_samples: list[float]
    subject_samples: list[float]
    target: Target | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def tail(self, samples: Sequence[float]) -> float:
        """The bad-side 95th percentile: high latencies, low rates."""
        return percentile(samples, 5 if self.higher_is_better else 95)

    @property
    def ratio(self) -> float:
        base = median(self.baseline_samples)
        return median(self.subject_samples) / base if base else math.nan

    @property
    def difference(self) -> float:
        """Subject median minus baseline median: what Custos adds."""
        return median(self.subject_samples) - median(self.baseline_samples)

    @property
    def subject_p99(self) -> float:
        return percentile(self.subject_samples, 99)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        value = self.target.value
        match self.target.kind:
            case "ratio_at_most":
                return self.ratio <= value
            case "ratio_at_least":
                return self.ratio >= value
            case "subject_at_least":
                return median(self.subject_samples) >= value
            case "subject_p99_below":
                return self.subject_p99 < value
            case "difference_at_most":
                return self.difference <= value

    def to_json(self) -> dict[str, Any]:
        def summary(samples: Sequence[float]) -> dict[str, Any]:
            return {
                "n": len(samples),
                "median": median(samples),
                "p95": self.tail(samples),
                "p99": percentile(samples, 1 if self.higher_is_better else 99),
                "min": min(samples) if samples else math.nan,
                "max": max(samples) if samples else math.nan,
            }

        return {
            "scenario": self.scenario,
            "measure": self.measure,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "baseline": {"name": self.baseline, **summary(self.baseline_samples)},
            "subject": {"name": self.subject, **summary(self.subject_samples)},
            "ratio": self.ratio,
            "target": None
            if self.target is None
            else {
                "kind": self.target.kind,
                "value": self.target.value,
                "text": self.target.describe(self.unit),
            },
            "met": self.met,
            "note": self.note,
            **({"extra": self.extra} if self.extra else {}),
        }


def alternate(rounds: int, runs: Sequence[tuple[str, Callable[[], T]]]) -> dict[str, list[T]]:
    """Run each callable once per round, in the same order every round: A B A B ..."""
    results: dict[str, list[T]] = {name: [] for name, _ in runs}
    for _ in range(rounds):
        for name, run in runs:
            results[name].append(run())
    return results


def flatten(groups: Sequence[Sequence[float]]) -> list[float]:
    return [value for group in groups for value in group]


def timed(call: Callable[[], object]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
