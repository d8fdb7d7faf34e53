"""Audit export and offline verification: a genuine export checks out; any tampering is named."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from custodian.audit_file import (
    entry_line,
    header_line,
    instance_line,
    parse_since,
    verify_lines,
    written_at_or_after,
)
from custodian.errors import LedgerError
from custodian.ledger import AuditEntry
from tests.unit.custodian.harness import custody

Doc = dict[str, Any]


def _history(tmp_path: Path) -> tuple[list[AuditEntry], list[Any], Callable[[int], bytes]]:
    """A deployment's life: two instances, receipts, a top-up, an expiry charged then partly settled."""

    async def scenario() -> tuple[list[AuditEntry], list[Any], dict[int, bytes]]:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=100, lease_size=20)
            first, one = await c.enrol("d", token)
            second, two = await c.enrol("d", token)
            lease_one = (await c.leases.acquire(first)).lease_id
            lease_two = (await c.leases.acquire(second)).lease_id
            await c.report(one, lease_one, 5)
            await c.report(one, lease_one, 20, want_more=True)
            await c.report(two, lease_two, 3)
            await c.deployments.grant("d", 10)
            c.clock.advance(31)
            await c.leases.expire_due()
            # The first instance comes back and settles; the second never does (17 units charged unproven).
            await c.report(one, lease_one, 22)
            async with c.ledger.transaction() as tx:
                entries = await tx.audit_entries()
                hashes = {seq: await tx.audit_hash(seq) for seq in range(len(entries) + 1)}
                return entries, await tx.instances(), hashes

    entries, instances, hashes = asyncio.run(scenario())
    return entries, instances, hashes.__getitem__


def _export(entries: list[AuditEntry], instances: list[Any], previous: bytes) -> list[Doc]:
    header = header_line(
        first_seq=entries[0].seq,
        last_seq=entries[-1].seq,
        previous_hash=previous,
        last_hash=entries[-1].hash,
        now=datetime(2030, 1, 2, tzinfo=UTC),
    )
    lines = [header, *map(instance_line, instances), *map(entry_line, entries)]
    return [json.loads(line) for line in lines]


def _verify(docs: list[Doc]) -> Any:
    return verify_lines(json.dumps(d).encode() for d in docs)


def test_a_full_export_verifies_with_every_receipt_and_the_usage_it_proves(tmp_path: Path) -> None:
    entries, instances, hash_of = _history(tmp_path)
    docs = _export(entries, instances, hash_of(0))
    assert docs[0]["type"] == "custos.audit-export/1"
    assert [d["type"] for d in docs[1:3]] == ["instance", "instance"]
    verified = _verify(docs)
    assert (verified.entries, verified.receipts, verified.anchored_instances) == (len(entries), 4, 0)
    assert verified.last_hash == entries[-1].hash
    totals = verified.deployments["d"]
    assert (totals.proven, totals.unreported) == (22 + 3, 17)


def test_a_partial_export_verifies_from_its_anchor(tmp_path: Path) -> None:
    entries, instances, hash_of = _history(tmp_path)
    start = next(e.seq for e in entries if e.action == "receipt" and e.detail["seq"] == 2)
    assert parse_since(str(start)) == start
    first_at = parse_since(entries[0].at)
    assert isinstance(first_at, datetime)
    assert all(written_at_or_after(e, first_at) for e in entries)
    future = parse_since("2999-01-01T00:00:00")
    assert isinstance(future, datetime)
    assert not any(written_at_or_after(e, future) for e in entries)
    with pytest.raises(LedgerError, match="neither"):
        parse_since("yesterday")
    docs = _export([e for e in entries if e.seq >= start], instances, hash_of(start - 1))
    verified = _verify(docs)
    assert (verified.first_seq, verified.anchored_instances) == (start, 1)
    # The same slice with another anchor does not verify.
    docs[0]["previous_hash"] = hash_of(start).hex()
    with pytest.raises(LedgerError, match=f"entry {start} does not match"):
        _verify(docs)


def _entry(docs: list[Doc], action: str, nth: int = 0) -> Doc:
    return [d for d in docs if d.get("action") == action][nth]


def _edit_detail(docs: list[Doc], action: str, **changes: Any) -> None:
    _entry(docs, action)["detail"].update(changes)


def _rehash(docs: list[Doc]) -> None:
    """Recompute the chain after an edit, as a forger who controls the file would."""
    previous = bytes.fromhex(docs[0]["previous_hash"])
    for doc in docs:
        if doc["type"] == "entry":
            entry = AuditEntry(
                doc["seq"], doc["at"], doc["actor"], doc["action"], doc["subject"], doc["detail"], b""
            )
            doc["hash"] = entry.chained_to(previous).hex()
            previous = bytes.fromhex(doc["hash"])
    docs[0]["last_hash"] = previous.hex()


def _forge_receipt_used(docs: list[Doc]) -> None:
    detail = _entry(docs, "receipt", 1)["detail"]
    body = base64.b64decode(detail["body"]).replace(b'"used":20', b'"used":19')
    detail.update(body=base64.b64encode(body).decode(), used=19)
    _rehash(docs)


def _swap_key(docs: list[Doc]) -> None:
    one, two = docs[1], docs[2]
    one["public_key"], two["public_key"] = two["public_key"], one["public_key"]
    one["key_sha256"], two["key_sha256"] = two["key_sha256"], one["key_sha256"]


def _drop_receipt(docs: list[Doc]) -> None:
    docs.remove(_entry(docs, "receipt", 1))
    for n, doc in enumerate(d for d in docs if d["type"] == "entry"):
        doc["seq"] = n + 1
    docs[0]["last_seq"] -= 1
    _rehash(docs)


TAMPERINGS: list[tuple[str, Callable[[list[Doc]], None], str]] = [
    ("edited-grant", lambda d: _edit_detail(d, "quota.grant", units=1000), "does not match its hash chain"),
    ("dropped-entry", lambda d: d.remove(_entry(d, "quota.grant")), "missing entry"),
    ("truncated", lambda d: d.pop(), "truncated"),
    ("receipt-forged-and-rehashed", _forge_receipt_used, "signature"),
    ("keys-swapped", _swap_key, "not the one enrolled"),
    ("receipt-dropped-and-rehashed", _drop_receipt, "skips ahead"),
    ("stated-used-differs", lambda d: (_edit_detail(d, "receipt", used=1), _rehash(d)), "does not state"),
    ("not-an-export", lambda d: d.pop(0), "header"),
]


@pytest.mark.parametrize(("tamper", "message"), [t[1:] for t in TAMPERINGS], ids=[t[0] for t in TAMPERINGS])
def test_tampering_is_named(tmp_path: Path, tamper: Callable[[list[Doc]], None], message: str) -> None:
    entries, instances, hash_of = _history(tmp_path)
    docs = _export(entries, instances, hash_of(0))
    tamper(docs)
    with pytest.raises(LedgerError, match=message):
        _verify(docs)


def test_garbage_lines_are_refused() -> None:
    with pytest.raises(LedgerError, match="not JSON"):
        verify_lines([b"{not json"])
    with pytest.raises(LedgerError, match="header"):
        verify_lines([])
