"""The ledger: schema migration, records, transactions and the hash-chained audit log."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from custodian import _ledger_sqlite as ledger_module
from custodian.audit_stream import LedgerAudit, check_tail
from custodian.errors import ConflictError, LedgerError
from custodian.ledger import (
    SCHEMA_VERSION,
    DeploymentRecord,
    InstanceRecord,
    LeaseRecord,
    Ledger,
    ModelRecord,
    Transaction,
)
from custodian.quota import Account, Allotment
from tests.unit.custodian.harness import Clock


def _model(name: str = "m") -> ModelRecord:
    return ModelRecord(
        model_id=name.encode().ljust(16, b"\0"),
        name=name,
        sha384=bytes(48),
        size=10,
        chunk_size=4,
        chunk_count=3,
        wrapped_key=b"k" * 60,
        created_at=Clock().now,
    )


def _deployment(model: ModelRecord, name: str = "d") -> DeploymentRecord:
    return DeploymentRecord(
        name=name,
        model_id=model.model_id,
        manifest="m",
        token_sha256=bytes(32),
        offline_grace_seconds=30,
        lease_size=10,
        suspended=False,
        account=Account(balance=5, granted=5),
        created_at=Clock().now,
    )


async def _add_instance_with_lease(ledger: Ledger, lease: LeaseRecord) -> None:
    """A model, deployment ``d`` of it, instance ``i1`` and ``lease`` of that instance."""
    model, now = _model(), Clock().now
    async with ledger.transaction() as tx:
        await tx.add_model(model)
        await tx.add_deployment(_deployment(model))
        await tx.add_instance(InstanceRecord("i1", "d", "sim", b"key", now, now, 0))
        await tx.add_lease(lease)


def test_records_round_trip_and_names_are_unique(ledger_db: str | Path) -> None:
    async def scenario() -> None:
        ledger = await Ledger.open(ledger_db, now=Clock())
        try:
            model = _model()
            async with ledger.transaction() as tx:
                await tx.add_model(model)
                await tx.add_deployment(_deployment(model))
            async with ledger.transaction() as tx:
                assert await tx.model("m") == model
                assert await tx.deployment("d") == _deployment(model)
                assert await tx.deployment("other") is None
            with pytest.raises(ConflictError):
                async with ledger.transaction() as tx:
                    await tx.add_model(_model())
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_a_lease_is_written_whole_and_never_becomes_active_again(ledger_db: str | Path) -> None:
    async def scenario() -> None:
        ledger = await Ledger.open(ledger_db, now=Clock())
        try:
            now = Clock().now
            lease = LeaseRecord("l1", "i1", "d", Allotment(limit=5, peak=5, used=0), "active", now)
            await _add_instance_with_lease(ledger, lease)
            used = replace(lease, units=Allotment(limit=5, peak=5, used=2), expires_at=now + timedelta(1))
            closed = replace(used, units=Allotment(limit=2, peak=5, used=2), state="closed")
            async with ledger.transaction() as tx:
                await tx.update_lease(used)
                assert await tx.lease("l1") == used
                await tx.update_lease(closed)
                assert await tx.lease("l1") == closed
                assert await tx.active_lease("i1") is None
            with pytest.raises(LedgerError, match="never becomes active again"):
                async with ledger.transaction() as tx:
                    await tx.update_lease(used)
            async with ledger.transaction() as tx:
                assert await tx.lease("l1") == closed
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_a_failed_transaction_leaves_nothing_behind(ledger_db: str | Path) -> None:
    async def fail_midway(ledger: Ledger) -> None:
        async with ledger.transaction() as tx:
            await tx.add_model(_model())
            await tx.audit("admin", "model.add", "m", {})
            raise RuntimeError("boom")

    async def scenario() -> None:
        ledger = await Ledger.open(ledger_db, now=Clock())
        try:
            with pytest.raises(RuntimeError):
                await fail_midway(ledger)
            async with ledger.transaction() as tx:
                assert await tx.models() == []
                assert await tx.audit_entries() == []
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_audit_log_chains_and_verifies(ledger_db: str | Path) -> None:
    async def scenario() -> None:
        ledger = await Ledger.open(ledger_db, now=Clock())
        try:
            for i in range(3):
                async with ledger.transaction() as tx:
                    await tx.audit("admin", "quota.grant", "d", {"units": i, "all": False})
            assert (await check_tail(LedgerAudit(ledger), None)).length == 3
            async with ledger.transaction() as tx:
                last = await tx.audit_entries(last=2)
            assert [e.seq for e in last] == [2, 3]
            assert last[0].detail == {"units": 1, "all": False}
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_audit_log_is_append_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        ledger = await Ledger.open(tmp_path / "l.db", now=Clock())
        try:
            async with ledger.transaction() as tx:
                await tx.audit("admin", "a", "s", {})
        finally:
            await ledger.close()

    asyncio.run(scenario())
    db = sqlite3.connect(tmp_path / "l.db")
    try:
        for statement in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(statement)
    finally:
        db.close()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("UPDATE audit SET detail = '{\"units\": 1000}' WHERE seq = 2", "entry 2"),
        ("UPDATE audit SET actor = 'someone' WHERE seq = 1", "entry 1"),
        ("DELETE FROM audit WHERE seq = 2", "missing entry 2"),
        ("UPDATE audit SET hash = zeroblob(32) WHERE seq = 3", "entry 3"),
    ],
    ids=["detail-changed", "actor-changed", "entry-removed", "hash-replaced"],
)
def test_tampering_with_the_audit_log_is_detected(tmp_path: Path, tamper: str, message: str) -> None:
    path = tmp_path / "l.db"

    async def write() -> None:
        ledger = await Ledger.open(path, now=Clock())
        try:
            for i in range(3):
                async with ledger.transaction() as tx:
                    await tx.audit("admin", "quota.grant", "d", {"units": i})
        finally:
            await ledger.close()

    asyncio.run(write())
    db = sqlite3.connect(path)
    try:
        # Someone with write access to the file drops the guards and edits history.
        db.executescript(
            "DROP TRIGGER audit_append_only_update; DROP TRIGGER audit_append_only_delete;" + tamper
        )
        db.commit()
    finally:
        db.close()

    async def verify() -> None:
        ledger = await Ledger.open(path, readonly=True)
        try:
            await check_tail(LedgerAudit(ledger), 1)
        finally:
            await ledger.close()

    with pytest.raises(LedgerError, match=message):
        asyncio.run(verify())


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "l.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LedgerError, match="newer"):
        asyncio.run(Ledger.open(tmp_path / "l.db"))


def test_readonly_needs_an_existing_migrated_ledger(tmp_path: Path) -> None:
    with pytest.raises(LedgerError):
        asyncio.run(Ledger.open(tmp_path / "absent.db", readonly=True))
    assert not (tmp_path / "absent.db").exists()
    sqlite3.connect(tmp_path / "old.db").close()
    with pytest.raises(LedgerError, match="migrate"):
        asyncio.run(Ledger.open(tmp_path / "old.db", readonly=True))


def test_an_older_ledger_migrates_forward_and_keeps_its_records(tmp_path: Path) -> None:
    async def scenario() -> None:
        ledger = await Ledger.open(tmp_path / "l.db", now=Clock())
        lease = LeaseRecord("l1", "i1", "d", Allotment(limit=5, peak=5, used=1), "active", Clock().now)
        await _add_instance_with_lease(ledger, lease)
        await ledger.close()
        # Back to schema v2, as a custodian of that version left it.
        with contextlib.closing(sqlite3.connect(tmp_path / "l.db")) as db:
            db.executescript(
                "DROP INDEX instances_by_deployment; DROP INDEX leases_by_instance;"
                " ALTER TABLE models DROP COLUMN inputs; ALTER TABLE models DROP COLUMN kind;"
                " ALTER TABLE leases DROP COLUMN prompt_tokens;"
                " ALTER TABLE leases DROP COLUMN completion_tokens;"
                " DROP TABLE spent_challenges; CREATE TABLE challenges (nonce BLOB PRIMARY KEY,"
                " deployment TEXT NOT NULL, expires_at REAL NOT NULL); PRAGMA user_version = 2;"
            )
        ledger = await Ledger.open(tmp_path / "l.db", now=Clock())
        try:
            async with ledger.transaction() as tx:
                assert await tx.lease("l1") == lease
                assert await tx.instance_count("d") == 1
        finally:
            await ledger.close()
        with contextlib.closing(sqlite3.connect(tmp_path / "l.db")) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            assert {"instances_by_deployment", "leases_by_instance", "spent_challenges_by_expiry"} <= indexes
            assert {"inputs", "kind"} <= {row[1] for row in db.execute("PRAGMA table_info(models)")}
            lease_columns = {row[1] for row in db.execute("PRAGMA table_info(leases)")}
            assert {"prompt_tokens", "completion_tokens"} <= lease_columns
            assert db.execute("SELECT DISTINCT kind FROM models").fetchall() in ([], [("classifier",)])
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "challenges" not in tables

    asyncio.run(scenario())


def test_reopening_keeps_everything(ledger_db: str | Path) -> None:
    async def scenario() -> None:
        ledger = await Ledger.open(ledger_db, now=Clock())
        async with ledger.transaction() as tx:
            await tx.add_model(_model())
        await ledger.close()
        ledger = await Ledger.open(ledger_db, now=Clock())
        try:
            async with ledger.transaction() as tx:
                assert [m.name for m in await tx.models()] == ["m"]
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_grouped_work_shares_one_commit_and_a_failing_piece_undoes_only_its_own_writes(
    ledger_db: str | Path,
) -> None:
    async def scenario() -> None:
        ledger = await Ledger.open(ledger_db, now=Clock())
        try:
            models = [_model(f"m{i}") for i in range(6)]

            async def add(tx: Transaction, model: ModelRecord) -> str:
                await tx.add_model(model)
                await tx.audit("test", "model.add", model.name, {})
                if model.name == "m3":
                    raise ConflictError("m3 refused after writing")
                return model.name

            commits = ledger._commits
            outcomes = await asyncio.gather(
                *(ledger.grouped(lambda tx, m=m: add(tx, m)) for m in models), return_exceptions=True
            )
            assert ledger._commits == commits + 1
            assert outcomes[:3] == ["m0", "m1", "m2"]
            assert outcomes[4:] == ["m4", "m5"]
            assert isinstance(outcomes[3], ConflictError)
            async with ledger.transaction() as tx:
                assert [m.name for m in await tx.models()] == ["m0", "m1", "m2", "m4", "m5"]
                entries = await tx.audit_entries()
            assert (await check_tail(LedgerAudit(ledger), 0)).length == 5
            # The refused piece's audit entry went with it, and the chain has no gap.
            assert [e.subject for e in entries] == ["m0", "m1", "m2", "m4", "m5"]
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_grouped_work_hears_of_a_failed_commit(tmp_path: Path) -> None:
    async def scenario() -> None:
        ledger = await Ledger.open(tmp_path / "l.db", now=Clock())
        try:

            async def deferred_violation(tx: Transaction) -> None:
                # A deferred foreign key is checked at COMMIT: the whole group fails there.
                tx._db.execute("PRAGMA defer_foreign_keys = ON")
                await tx.add_deployment(_deployment(_model("missing")))

            async def fine(tx: Transaction) -> str:
                await tx.add_model(_model("ok"))
                return "ok"

            outcomes = await asyncio.gather(
                ledger.grouped(fine), ledger.grouped(deferred_violation), return_exceptions=True
            )
            assert all(isinstance(o, LedgerError) for o in outcomes), outcomes
            async with ledger.transaction() as tx:
                assert await tx.models() == []
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_a_checkpoint_runs_beside_transactions_then_catches_up_so_the_wal_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "CHECKPOINT_EVERY", 2)
    # Passes go on while a pass finds any new frame: here the first (held until m2-m4 are committed)
    # copies them all, the second finds none; then one pass holding the lock.
    monkeypatch.setattr(ledger_module, "CATCH_UP_FRAMES", 1)
    path = tmp_path / "l.db"
    wal = tmp_path / "l.db-wal"
    release, first, locked = threading.Event(), threading.Event(), threading.Event()
    copies: list[tuple[int, bool]] = []  # (thread, whether the ledger's lock was held)
    ledger: Ledger | None = None
    copy = ledger_module._Checkpointer._copy

    def observed_copy(self: ledger_module._Checkpointer) -> int | None:
        assert ledger is not None
        copies.append((threading.get_ident(), ledger._lock.locked()))
        if len(copies) == 1:
            first.set()
            release.wait(10)
        frames = copy(self)
        if copies[-1][1]:
            locked.set()
        return frames

    monkeypatch.setattr(ledger_module._Checkpointer, "_copy", observed_copy)

    def names_in_the_database_file() -> set[str]:
        # immutable=1 reads the main file only, not the WAL.
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?immutable=1", uri=True)) as db:
            return {row[0] for row in db.execute("SELECT name FROM models")}

    def frames_in_the_wal() -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            _busy, frames, _copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(frames)

    async def add(name: str) -> None:
        assert ledger is not None
        async with ledger.transaction() as tx:
            await tx.add_model(_model(name))

    async def scenario() -> None:
        nonlocal ledger
        ledger = await Ledger.open(path, now=Clock())
        try:
            await add("m0")
            await add("m1")  # the second commit starts a checkpoint
            assert await asyncio.to_thread(first.wait, 10)
            frames_before = (wal.stat().st_size - 32) // (4096 + 24)
            # The first copy is held in its thread, without the lock: transactions still commit.
            for name in ("m2", "m3", "m4"):
                await asyncio.wait_for(add(name), 10)
            assert copies == [(copies[0][0], False)]
            assert copies[0][0] != threading.get_ident()
            release.set()
            # Then what was written meanwhile (little) is copied holding the lock: the file has
            # everything ...
            assert await asyncio.to_thread(locked.wait, 10)
            async with ledger.transaction():
                pass
            assert [held for _thread, held in copies] == [False, False, True]
            assert names_in_the_database_file() == {"m0", "m1", "m2", "m3", "m4"}
            # ... and the WAL starts over at the next commit instead of growing.
            await add("m5")
            assert 0 < frames_in_the_wal() < frames_before
        finally:
            release.set()
            await ledger.close()
        assert names_in_the_database_file() == {"m0", "m1", "m2", "m3", "m4", "m5"}

    asyncio.run(scenario())
