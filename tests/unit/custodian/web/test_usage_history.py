"""Usage per hour and per day from receipts (cumulative per lease) and audited grants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from custodian.audit import AuditEntry
from custodian.records import ReceiptRecord
from custodian.web.chart import bar_chart
from custodian.web.usage_history import history

NOW = datetime(2030, 1, 2, 15, 30, tzinfo=UTC)


def _receipt(instance: str, lease: str, seq: int, used: int, at: datetime) -> ReceiptRecord:
    return ReceiptRecord(instance, seq, lease, used, b"", b"", b"", at)


def _grant(units: int, at: datetime) -> AuditEntry:
    return AuditEntry(1, at.isoformat(), "admin", "quota.grant", "d", {"units": units}, b"")


def test_hourly_usage_is_the_growth_of_each_lease_count() -> None:
    hour = timedelta(hours=1)
    receipts = [
        _receipt("i1", "L1", 3, 10, NOW - 2 * hour),  # 4 were used before the window's receipts
        _receipt("i1", "L1", 4, 15, NOW - hour),
        _receipt("i2", "L2", 1, 2, NOW - hour),
        _receipt("i1", "L3", 5, 1, NOW),  # a new lease starts from 0
        _receipt("i1", "L1", 6, 15, NOW),  # a retried count adds nothing
    ]
    made = history("hour", NOW, receipts, [_grant(30, NOW - hour), _grant(5, NOW - 30 * hour)],
                   earlier_used={"L1": 4})  # fmt: skip
    assert len(made.starts) == 24
    assert made.starts[-1] == NOW.replace(minute=0)
    assert made.used[-3:] == [6, 7, 1]
    assert made.used_by_instance["i1"][-3:] == [6, 5, 1]
    assert made.used_by_instance["i2"][-3:] == [0, 2, 0]
    assert made.granted[-2] == 30
    assert sum(made.granted) == 30  # the older grant is outside the last 24 hours


def test_daily_buckets_cover_thirty_days() -> None:
    made = history("day", NOW, [_receipt("i", "L", 1, 9, NOW - timedelta(days=29))], [_grant(5, NOW)])
    assert len(made.starts) == 30
    assert made.used[0] == 9
    assert made.granted[-1] == 5


@pytest.mark.parametrize(("values", "heights"), [([0, 0], [0.0, 0.0]), ([1, 4], [46.0, 184.0])])
def test_bars_are_drawn_to_scale(values: list[int], heights: list[float]) -> None:
    chart = bar_chart(["a", "b"], {"used": values}, ["a", "b"])
    assert [b.height for b in chart.bars] == heights
    assert all(b.y + b.height == chart.baseline for b in chart.bars)
