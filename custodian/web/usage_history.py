"""Usage over time, from the receipts (used) and the audit log's grants (granted), in buckets.

A receipt states how many units its lease has used so far, so what a lease
used within a bucket is the growth of that count since its previous receipt.
Buckets are hours (the last ``HOURS``) or days (the last ``DAYS``), in UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from custodian.audit import AuditEntry
from custodian.records import ReceiptRecord

HOURS = 24
DAYS = 30
SPANS = {"hour": (timedelta(hours=1), HOURS), "day": (timedelta(days=1), DAYS)}


@dataclass(frozen=True)
class History:
    span: str
    starts: list[datetime]
    granted: list[int]
    used: list[int]
    used_by_instance: dict[str, list[int]]

    def to_json(self) -> dict[str, object]:
        return {
            "span": self.span,
            "buckets": [s.isoformat() for s in self.starts],
            "granted": self.granted,
            "used": self.used,
            "used_by_instance": self.used_by_instance,
        }


def window(span: str, now: datetime) -> list[datetime]:
    """The bucket starts ending with the one holding ``now``, oldest first."""
    width, count = SPANS[span]
    if span == "hour":
        last = now.replace(minute=0, second=0, microsecond=0)
    else:
        last = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return [last - width * (count - 1 - i) for i in range(count)]


def history(
    span: str,
    now: datetime,
    receipts: Sequence[ReceiptRecord],
    grants: Iterable[AuditEntry],
    *,
    earlier_used: dict[str, int] | None = None,
) -> History:
    """``receipts`` oldest first; ``earlier_used``: each lease's count before the window, where known."""
    starts = window(span, now)
    width = SPANS[span][0]
    first = starts[0]

    def bucket(at: datetime) -> int | None:
        if at < first:
            return None
        index = int((at - first) // width)
        return index if index < len(starts) else None

    used = [0] * len(starts)
    by_instance: dict[str, list[int]] = {}
    seen = dict(earlier_used or {})
    for receipt in receipts:
        grown = receipt.used - seen.get(receipt.lease_id, 0)
        seen[receipt.lease_id] = max(receipt.used, seen.get(receipt.lease_id, 0))
        index = bucket(receipt.received_at)
        if index is None or grown <= 0:
            continue
        used[index] += grown
        by_instance.setdefault(receipt.instance_id, [0] * len(starts))[index] += grown
    granted = [0] * len(starts)
    for entry in grants:
        index = bucket(datetime.fromisoformat(entry.at))
        units = entry.detail.get("units")
        if index is not None and isinstance(units, int):
            granted[index] += units
    return History(span, starts, granted, used, by_instance)
