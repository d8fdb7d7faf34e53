"""Every refusal this custodian counted in the last hour, from its metrics, not the audit log's sample.

The audit log keeps a rate-limited sample of refusals (``custodian.throttle``);
the counters ``custos_custodian_enrol_refusals_total`` and
``custos_custodian_receipt_refusals_total`` count every one, by reason, but
only since this process started and with no time attached. So the console
takes a snapshot of them at most once a ``STEP`` (on each read, and from a
ticker while the console runs) and keeps the last hour's: what was refused in
the last hour is the counters now less the newest snapshot at least an hour
old, or less the first one while the console has run for less than an hour
(the answer says from when it counts). The counters have no deployment label
(label sets stay small and fixed), so these are the custodian's totals; and
they are this process's: each replica counts its own.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter

from custodian.metrics import CustodianMetrics

WINDOW = timedelta(hours=1)
STEP = timedelta(minutes=1)
KINDS = ("enrol", "receipt")


@dataclass(frozen=True)
class _Snapshot:
    at: datetime
    counts: dict[tuple[str, str], float]  # (kind, reason) -> the counter's value


def _read(counter: Counter, kind: str) -> dict[tuple[str, str], float]:
    return {
        (kind, s.labels["reason"]): s.value
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


class RefusalCounts:
    def __init__(self, metrics: CustodianMetrics, now: Callable[[], datetime]) -> None:
        self._counters = {"enrol": metrics.enrol_refusals, "receipt": metrics.receipt_refusals}
        self._now = now
        self._snapshots: collections.deque[_Snapshot] = collections.deque()
        self.sample()

    def sample(self) -> None:
        """Keep the counters now as a snapshot, if the newest kept is a ``STEP`` old."""
        self._sample()

    def _sample(self) -> _Snapshot:
        now = self._now()
        current = _Snapshot(now, self._current())
        if not self._snapshots or now - self._snapshots[-1].at >= STEP:
            self._snapshots.append(current)
        # Keep one snapshot at least a WINDOW old: the baseline for the last hour.
        while len(self._snapshots) > 1 and now - self._snapshots[1].at >= WINDOW:
            self._snapshots.popleft()
        return current

    def last_hour(self) -> dict[str, Any]:
        """Refusals since the baseline, by kind and reason, and the time they are counted from."""
        current = self._sample()
        baseline = self._snapshots[0]
        by_reason: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
        for (kind, reason), value in sorted(current.counts.items()):
            grown = int(value - baseline.counts.get((kind, reason), 0.0))
            if grown > 0:
                by_reason[kind][reason] = grown
        return {
            "since": baseline.at.isoformat(timespec="seconds"),
            "total": {kind: sum(by_reason[kind].values()) for kind in KINDS},
            "by_reason": by_reason,
        }

    def __len__(self) -> int:
        """The snapshots kept: about one a ``STEP`` over the last ``WINDOW``, whatever the reads."""
        return len(self._snapshots)

    def _current(self) -> dict[tuple[str, str], float]:
        counts: dict[tuple[str, str], float] = {}
        for kind, counter in self._counters.items():
            counts.update(_read(counter, kind))
        return counts
