"""The last hour's refusals from the counters: snapshots a minute apart, the baseline an hour old."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from custodian.metrics import CustodianMetrics
from custodian.web.refusal_counts import RefusalCounts
from tests.unit.custodian.harness import Clock


def test_only_the_last_hours_refusals_are_counted_by_kind_and_reason() -> None:
    metrics, clock = CustodianMetrics(), Clock(datetime(2030, 1, 1, tzinfo=UTC))
    counts = RefusalCounts(metrics, clock)
    for minute in range(180):  # three hours, a refusal each minute, read each minute
        metrics.enrol_refusals.labels("token" if minute % 2 else "nonce").inc()
        clock.advance(60)
        counts.sample()
    metrics.receipt_refusals.labels("replay").inc(2)
    last = counts.last_hour()
    assert last["total"] == {"enrol": 60, "receipt": 2}
    assert last["by_reason"] == {"enrol": {"nonce": 30, "token": 30}, "receipt": {"replay": 2}}
    assert datetime.fromisoformat(last["since"]) == clock.now - timedelta(hours=1)


def test_before_an_hour_has_passed_it_counts_from_the_start_and_says_so() -> None:
    metrics, clock = CustodianMetrics(), Clock(datetime(2030, 1, 1, tzinfo=UTC))
    metrics.enrol_refusals.labels("token").inc(4)  # before the console started: not counted
    counts = RefusalCounts(metrics, clock)
    metrics.enrol_refusals.labels("token").inc()
    clock.advance(600)
    last = counts.last_hour()
    assert last["total"] == {"enrol": 1, "receipt": 0}
    assert last["since"] == "2030-01-01T00:00:00+00:00"


def test_reads_within_a_minute_keep_no_more_snapshots() -> None:
    metrics, clock = CustodianMetrics(), Clock(datetime(2030, 1, 1, tzinfo=UTC))
    counts = RefusalCounts(metrics, clock)
    for _ in range(10_000):  # the refresh script, twice a second for well over an hour
        clock.advance(0.5)
        counts.last_hour()
    assert len(counts) <= 62
