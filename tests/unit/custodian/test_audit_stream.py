"""Issue 13 item 2: `custodian audit` and its export stream the log, in bounded memory."""

from __future__ import annotations

import asyncio
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest

from custodian.audit_file import verify_file
from custodian.audit_stream import LedgerAudit, check_tail, export
from custodian.errors import ConsoleError
from custodian.ledger import Ledger
from tests.unit.custodian.harness import Clock

NOW = datetime(2030, 1, 2, tzinfo=UTC)


async def _ledger_with(path: Path, entries: int, detail_bytes: int) -> None:
    ledger = await Ledger.open(path, now=Clock())
    try:
        for n in range(entries):
            async with ledger.transaction() as tx:
                await tx.audit("enclave:x", "receipt.refuse", "d", {"n": n, "lease": "f" * detail_bytes})
    finally:
        await ledger.close()


def test_checking_a_large_log_holds_a_page_not_the_log(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    asyncio.run(_ledger_with(path, 600, 50_000))  # 30 MB of entries, as a flooding enclave left them

    async def check() -> tuple[int, int]:
        ledger = await Ledger.open(path, readonly=True)
        try:
            tracemalloc.start()
            tail = await check_tail(LedgerAudit(ledger), 3)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        finally:
            await ledger.close()
        assert [e.detail["n"] for e in tail.shown] == [597, 598, 599]
        return tail.length, peak

    length, peak = asyncio.run(check())
    assert length == 600
    assert peak < 15_000_000, f"peak {peak} bytes"


def test_an_export_streams_verifies_and_refuses_a_planted_link(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    asyncio.run(_ledger_with(path, 150, 10))
    out = tmp_path / "audit.jsonl"
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out.with_name("audit.jsonl.partial").symlink_to(victim)

    async def run(since: str | None) -> tuple[int, int]:
        ledger = await Ledger.open(path, readonly=True)
        try:
            done = await export(LedgerAudit(ledger), out, since, now=NOW)
        finally:
            await ledger.close()
        return done.first_seq, done.entries

    with pytest.raises(ConsoleError, match="exists"):
        asyncio.run(run(None))
    assert victim.read_text() == "keep me"
    out.with_name("audit.jsonl.partial").unlink()
    assert asyncio.run(run(None)) == (1, 150)
    assert not out.is_symlink()
    assert (out.stat().st_mode & 0o777) == 0o600
    assert verify_file(out).entries == 150
    assert asyncio.run(run("100")) == (100, 51)
    verified = verify_file(out)
    assert (verified.first_seq, verified.entries) == (100, 51)
    assert asyncio.run(run("2999-01-01T00:00:00")) == (0, 0)
    assert verify_file(out).entries == 0
