"""The ledger's recurring reads find their rows through indexes: none scans a table that only grows.

Leases, instances, receipts and the audit log grow for as long as the custodian
runs. A statement that scans one of them gets slower every day, and the usage
reports queue behind it (the sweep runs every second, holding the ledger). Every
statement of the report path, the sweep, the gauges and a deployment's roster
is captured here as SQLite runs it and explained (``EXPLAIN QUERY PLAN``). The
roster of every deployment reads every instance by its nature, and only when
asked.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

from tests.unit.custodian.harness import custody

GROWING = ("leases", "instances", "receipts", "audit")
# The audit head: a walk backwards along the rowid that stops at the first row.
ALLOWED = ("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",)


def _table_scans(db: Path, statements: set[str]) -> dict[str, list[str]]:
    """Each statement that scans a growing table, with the offending lines of its plan."""
    found: dict[str, list[str]] = {}
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as explain:
        for sql in statements:
            plan = [row[3] for row in explain.execute(f"EXPLAIN QUERY PLAN {sql}")]
            scans = [line for line in plan if re.fullmatch(rf"SCAN ({'|'.join(GROWING)})", line)]
            if scans:
                found[sql] = scans
    return found


def test_no_recurring_statement_scans_a_growing_table(tmp_path: Path) -> None:
    statements: set[str] = set()

    def keep(sql: str) -> None:
        if sql.split(None, 1)[0].upper() in {"SELECT", "UPDATE", "DELETE"} and sql not in ALLOWED:
            statements.add(sql)

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=1000, lease_size=100)
            enrolled = [await c.enrol("d", token) for _ in range(2)]
            c.ledger._conn.set_trace_callback(keep)
            for instance, enclave in enrolled:
                lease = await c.leases.acquire(instance)
                await c.report(enclave, lease.lease_id, 3, want_more=True)
                await c.report(enclave, lease.lease_id, 5, final=True)
                await c.leases.touch(instance)
                await c.leases.acquire(instance)
            c.clock.advance(3600)
            assert await c.leases.expire_due() == 2
            await c.enrolment.purge_challenges()
            await c.deployments.usage()
            await c.roster.enclaves("d")
            await c.leases.resume()
            c.ledger._conn.set_trace_callback(None)

    asyncio.run(scenario())
    assert len(statements) > 10, statements  # the capture saw the work
    assert _table_scans(tmp_path / "ledger.sqlite3", statements) == {}


def test_the_check_finds_a_scan(tmp_path: Path) -> None:
    db = tmp_path / "t.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE leases (lease_id TEXT PRIMARY KEY, instance_id TEXT)")
    scans = _table_scans(db, {"SELECT * FROM leases WHERE instance_id = 'x'"})
    assert scans == {"SELECT * FROM leases WHERE instance_id = 'x'": ["SCAN leases"]}
