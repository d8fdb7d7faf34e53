"""The ledger: models, deployments, instances, leases, receipts and the audit log in SQLite.

This is the only module that touches the database (through ``aiosqlite``). Its
interface is small on purpose: ``Ledger.transaction()`` yields a
``Transaction`` whose methods read and write whole records
(``custodian.records``), so another backend (PostgreSQL, for several custodian
replicas) can take its place.

Every change happens in one ``BEGIN IMMEDIATE`` transaction together with its
audit entry. Frequent small changes (usage reports) may share a commit:
``Ledger.grouped(work)`` queues ``work`` and runs everything queued meanwhile in
one transaction, each piece inside its own savepoint, so a piece that raises
undoes only its own writes; nobody hears back before the commit.

How it runs. A transaction's statements are short (a usage report is some
thirty statements on indexed rows, a few microseconds each), so they run
synchronously on the event loop's thread, on the connection ``aiosqlite``
opened: a round trip to aiosqlite's worker thread for each statement cost
far more than the statement (three for a read), and the transactions are
serialised anyway. Nothing else awaits between ``BEGIN`` and ``COMMIT`` but
the caller's own code; the lock keeps one transaction at a time on the
connection, which is why it may be used from both threads
(``check_same_thread=False``). What can block on the disk stays off the
loop: opening, migrating, closing, and the WAL checkpoints
(``wal_autocheckpoint`` is off). A checkpoint starts every
``CHECKPOINT_EVERY`` commits on a connection of its own in a worker thread
(``_Checkpointer``), and transactions go on meanwhile: a ``PASSIVE``
checkpoint never waits for a writer, and copying the WAL and fsyncing takes
10-100 ms here, which a writer waiting for it would add to the latency of
every report queued behind it. Only what was committed during the last pass
is then copied holding the lock, so that the WAL can start over.

Durability: WAL with ``synchronous = NORMAL``. Each commit is in the WAL file
before the transaction returns, so an acknowledged report survives the
custodian's crash or ``kill -9`` (the operating system has the write); the
WAL is fsynced at each checkpoint. An operating-system crash or power loss
can lose the transactions since the last checkpoint, never corrupt the
database. ``FULL`` would fsync every commit (about 0.25 ms here, one commit at
a time), capping the ledger near the 2,000 reports/s it must sustain; the
chosen trade is the one SQLite documents as safe for WAL.

The audit log and the receipts are append-only (triggers refuse
updates and deletes); the audit log is hash-chained (``custodian.audit``). The
schema (``custodian._schema``) is versioned with ``PRAGMA user_version`` and
migrated forward on open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite

from custodian._rows import (
    audit_row,
    deployment_row,
    instance_row,
    lease_row,
    model_row,
    receipt_row,
    ts,
)
from custodian._schema import MIGRATIONS
from custodian.audit import GENESIS, AuditEntry, AuditValue
from custodian.errors import ConflictError, LedgerError
from custodian.records import (
    LEASE_STATES,
    DeploymentRecord,
    InstanceRecord,
    LeaseRecord,
    ModelRecord,
    ReceiptRecord,
)

__all__ = [
    "LEASE_STATES",
    "SCHEMA_VERSION",
    "AuditEntry",
    "AuditValue",
    "DeploymentRecord",
    "InstanceRecord",
    "LeaseRecord",
    "Ledger",
    "ModelRecord",
    "ReceiptRecord",
    "Transaction",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = len(MIGRATIONS)


# Commits between two WAL checkpoints (``_Checkpointer``).
CHECKPOINT_EVERY = 500
# A checkpoint makes at most this many passes beside the writers, and stops when a pass finds fewer
# new frames than CATCH_UP_FRAMES (4 MiB of pages): those are copied holding the lock.
CHECKPOINT_PASSES = 4
CATCH_UP_FRAMES = 1024
# Most pieces of work one grouped commit carries (``Ledger.grouped``).
GROUP_LIMIT = 256

T = TypeVar("T")


class Transaction:
    """Reads and writes of whole records inside one ledger transaction.

    The methods are coroutines (another backend may need to await), but on
    SQLite each runs its statement at once, on the caller's thread.
    """

    def __init__(self, db: sqlite3.Connection, now: datetime) -> None:
        self._db = db
        self.now = now
        # The audit log's last (seq, hash) as this transaction left it; None: read it from the table.
        self._audit_head: tuple[int, bytes] | None = None

    def _undone(self) -> None:
        """Some of this transaction's writes were rolled back: forget what was kept of them."""
        self._audit_head = None

    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        cursor = self._db.execute(sql, params)
        try:
            row: sqlite3.Row | None = cursor.fetchone()
        finally:
            cursor.close()
        return row

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._db.execute(sql, params).fetchall()

    async def _insert(self, what: str, sql: str, params: tuple[Any, ...]) -> None:
        try:
            self._db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"{what} already exists") from exc

    # ------------------------------------------------------------------ models

    async def add_model(self, m: ModelRecord) -> None:
        await self._insert(
            f"model {m.name!r}",
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                m.model_id,
                m.name,
                m.sha384,
                m.size,
                m.chunk_size,
                m.chunk_count,
                m.wrapped_key,
                ts(m.created_at),
                m.inputs,
            ),
        )

    async def model(self, name: str) -> ModelRecord | None:
        row = await self._one("SELECT * FROM models WHERE name = ?", (name,))
        return model_row(row) if row else None

    async def model_by_id(self, model_id: bytes) -> ModelRecord | None:
        row = await self._one("SELECT * FROM models WHERE model_id = ?", (model_id,))
        return model_row(row) if row else None

    async def models(self) -> list[ModelRecord]:
        return [model_row(r) for r in await self._all("SELECT * FROM models ORDER BY name")]

    # ------------------------------------------------------------- deployments

    async def add_deployment(self, d: DeploymentRecord) -> None:
        a = d.account
        await self._insert(
            f"deployment {d.name!r}",
            "INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                d.name,
                d.model_id,
                d.manifest,
                d.token_sha256,
                d.offline_grace_seconds,
                d.lease_size,
                d.suspended,
                a.balance,
                a.granted,
                a.revoked,
                a.used,
                a.overdrawn,
                ts(d.created_at),
                a.unreported,
                d.zeroize_after_seconds,
            ),
        )

    async def update_deployment(self, d: DeploymentRecord) -> None:
        """Write the mutable fields: token, suspension and the account."""
        a = d.account
        self._db.execute(
            "UPDATE deployments SET token_sha256 = ?, suspended = ?, balance = ?, granted = ?, revoked = ?,"
            " used = ?, overdrawn = ?, unreported = ? WHERE name = ?",
            (
                d.token_sha256,
                d.suspended,
                a.balance,
                a.granted,
                a.revoked,
                a.used,
                a.overdrawn,
                a.unreported,
                d.name,
            ),
        )

    async def deployment(self, name: str) -> DeploymentRecord | None:
        row = await self._one("SELECT * FROM deployments WHERE name = ?", (name,))
        return deployment_row(row) if row else None

    async def deployments(self) -> list[DeploymentRecord]:
        return [deployment_row(r) for r in await self._all("SELECT * FROM deployments ORDER BY name")]

    # -------------------------------------------------------- spent challenges

    async def spend(self, key: bytes, expires_at: datetime) -> bool:
        """Record a nonce or credential challenge (by ``key``) as used; False if it already was.

        Kept until the challenge expires: after that its own expiry refuses it.
        """
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO spent_challenges VALUES (?, ?)", (key, ts(expires_at))
        )
        return cursor.rowcount == 1

    async def purge_spent(self) -> int:
        cursor = self._db.execute("DELETE FROM spent_challenges WHERE expires_at < ?", (ts(self.now),))
        return cursor.rowcount

    # --------------------------------------------------------------- instances

    async def add_instance(self, i: InstanceRecord) -> None:
        await self._insert(
            f"instance {i.instance_id}",
            "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                i.instance_id,
                i.deployment,
                i.platform,
                i.public_key,
                ts(i.enrolled_at),
                ts(i.last_seen),
                i.last_seq,
            ),
        )

    async def update_instance(self, i: InstanceRecord) -> None:
        """Write the mutable fields: last contact and last usage sequence."""
        self._db.execute(
            "UPDATE instances SET last_seen = ?, last_seq = ? WHERE instance_id = ?",
            (ts(i.last_seen), i.last_seq, i.instance_id),
        )

    async def instance(self, instance_id: str) -> InstanceRecord | None:
        row = await self._one("SELECT * FROM instances WHERE instance_id = ?", (instance_id,))
        return instance_row(row) if row else None

    async def instance_count(self, deployment: str) -> int:
        row = await self._one("SELECT count(*) AS n FROM instances WHERE deployment = ?", (deployment,))
        return int(row["n"]) if row else 0

    async def instances(self, deployment: str | None = None) -> list[InstanceRecord]:
        if deployment is None:
            rows = await self._all("SELECT * FROM instances ORDER BY enrolled_at, instance_id")
        else:
            rows = await self._all(
                "SELECT * FROM instances WHERE deployment = ? ORDER BY enrolled_at, instance_id",
                (deployment,),
            )
        return [instance_row(r) for r in rows]

    # ------------------------------------------------------------------ leases

    async def add_lease(self, lease: LeaseRecord) -> None:
        u = lease.units
        await self._insert(
            f"lease for instance {lease.instance_id}",
            "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                lease.lease_id,
                lease.instance_id,
                lease.deployment,
                u.limit,
                u.peak,
                u.used,
                lease.state,
                ts(lease.expires_at),
                u.unreported,
            ),
        )

    async def update_lease(self, lease: LeaseRecord) -> None:
        """Write the mutable fields: the units, the expiry and, when it leaves ``active``, the state.

        A lease never becomes active again, so an active lease's state is left alone: writing
        the column would rewrite both indexes on it at every usage report.
        """
        u = lease.units
        if lease.active:
            cursor = self._db.execute(
                "UPDATE leases SET lim = ?, peak = ?, used = ?, unreported = ?, expires_at = ?"
                " WHERE lease_id = ? AND state = 'active'",
                (u.limit, u.peak, u.used, u.unreported, ts(lease.expires_at), lease.lease_id),
            )
            if cursor.rowcount != 1:
                raise LedgerError(
                    f"lease {lease.lease_id} is not active in the ledger; a lease never becomes active again"
                )
            return
        self._db.execute(
            "UPDATE leases SET lim = ?, peak = ?, used = ?, unreported = ?, state = ?, expires_at = ?"
            " WHERE lease_id = ?",
            (u.limit, u.peak, u.used, u.unreported, lease.state, ts(lease.expires_at), lease.lease_id),
        )

    async def lease(self, lease_id: str) -> LeaseRecord | None:
        row = await self._one("SELECT * FROM leases WHERE lease_id = ?", (lease_id,))
        return lease_row(row) if row else None

    async def active_lease(self, instance_id: str) -> LeaseRecord | None:
        row = await self._one(
            "SELECT * FROM leases WHERE instance_id = ? AND state = 'active'", (instance_id,)
        )
        return lease_row(row) if row else None

    async def active_leases(self, deployment: str) -> list[LeaseRecord]:
        rows = await self._all(
            "SELECT * FROM leases WHERE deployment = ? AND state = 'active' ORDER BY rowid", (deployment,)
        )
        return [lease_row(r) for r in rows]

    async def due_leases(self) -> list[LeaseRecord]:
        """Active leases whose expiry has passed.

        Read through the partial index of active leases (one per instance), not the table of every
        lease ever held: SQLite's planner scans the table unless told (``INDEXED BY``).
        """
        rows = await self._all(
            "SELECT * FROM leases INDEXED BY one_active_lease"
            " WHERE state = 'active' AND expires_at < ? ORDER BY rowid",
            (ts(self.now),),
        )
        return [lease_row(r) for r in rows]

    async def latest_lease(self, instance_id: str) -> LeaseRecord | None:
        """The instance's active lease, else the one it held last."""
        active = await self.active_lease(instance_id)
        if active is not None:
            return active
        # Walks the instance's index entries backwards from the newest: no sort of all its leases.
        row = await self._one(
            "SELECT * FROM leases WHERE instance_id = ? ORDER BY rowid DESC LIMIT 1", (instance_id,)
        )
        return lease_row(row) if row else None

    async def active_leases_all(self) -> list[LeaseRecord]:
        """Every active lease, through the partial index of them (see ``due_leases``)."""
        rows = await self._all(
            "SELECT * FROM leases INDEXED BY one_active_lease WHERE state = 'active' ORDER BY rowid"
        )
        return [lease_row(r) for r in rows]

    # ---------------------------------------------------------------- receipts

    async def add_receipt(self, r: ReceiptRecord) -> None:
        await self._insert(
            f"receipt {r.seq} of instance {r.instance_id}",
            "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (r.instance_id, r.seq, r.lease_id, r.used, r.body, r.signature, r.digest, ts(r.received_at)),
        )

    async def receipt(self, instance_id: str, seq: int) -> ReceiptRecord | None:
        row = await self._one("SELECT * FROM receipts WHERE instance_id = ? AND seq = ?", (instance_id, seq))
        return receipt_row(row) if row else None

    async def receipts_since(self, deployment: str, since: datetime) -> list[ReceiptRecord]:
        """The receipts of a deployment's instances received at or after ``since``, oldest first."""
        rows = await self._all(
            "SELECT r.* FROM receipts r JOIN instances i ON i.instance_id = r.instance_id"
            " WHERE i.deployment = ? AND r.received_at >= ? ORDER BY r.received_at, r.seq",
            (deployment, ts(since)),
        )
        return [receipt_row(r) for r in rows]

    # ------------------------------------------------------------------- audit

    async def audit(self, actor: str, action: str, subject: str, detail: Mapping[str, AuditValue]) -> None:
        """Append one entry to the hash-chained audit log."""
        if self._audit_head is None:
            last = await self._one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            self._audit_head = (last["seq"], bytes(last["hash"])) if last else (0, GENESIS)
        seq, previous = self._audit_head[0] + 1, self._audit_head[1]
        entry = AuditEntry(seq, self.now.isoformat(), actor, action, subject, dict(detail), b"")
        digest = entry.chained_to(previous)
        self._db.execute(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, entry.at, actor, action, subject, json.dumps(dict(detail), sort_keys=True), digest),
        )
        self._audit_head = (seq, digest)

    async def audit_entries(self, *, last: int | None = None, since: int = 1) -> list[AuditEntry]:
        """The audit log in order from entry ``since``, or only its ``last`` entries."""
        if last is None:
            rows = await self._all("SELECT * FROM audit WHERE seq >= ? ORDER BY seq", (since,))
        else:
            rows = await self._all(
                "SELECT * FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq", (last,)
            )
        return [audit_row(r) for r in rows]

    async def audit_page(self, after: int, limit: int) -> list[AuditEntry]:
        """At most ``limit`` entries following entry ``after``, in order: the log a page at a time."""
        rows = await self._all("SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
        return [audit_row(r) for r in rows]

    async def audit_search(
        self, *, subject: str = "", action: str = "", before: int = 0, limit: int = 50
    ) -> list[AuditEntry]:
        """At most ``limit`` entries before entry ``before`` (0: the newest), newest first, matching
        ``subject`` and ``action`` exactly where they are given."""
        rows = await self._all(
            "SELECT * FROM audit WHERE (? = 0 OR seq < ?) AND (? = '' OR subject = ?)"
            " AND (? = '' OR action = ?) ORDER BY seq DESC LIMIT ?",
            (before, before, subject, subject, action, action, limit),
        )
        return [audit_row(r) for r in rows]

    async def audit_hash(self, seq: int) -> bytes:
        """The hash of entry ``seq`` (32 zero bytes for 0): where an export from ``seq + 1`` starts."""
        if seq <= 0:
            return GENESIS
        row = await self._one("SELECT hash FROM audit WHERE seq = ?", (seq,))
        if row is None:
            raise LedgerError(f"the audit log has no entry {seq}")
        return bytes(row["hash"])


class Ledger:
    """One SQLite database; transactions are serialised on one connection."""

    def __init__(
        self, db: aiosqlite.Connection, uri: str, now: Callable[[], datetime], *, readonly: bool = False
    ) -> None:
        self._db = db
        # The same connection, for the statements run on the event loop's thread (see the module notes).
        self._conn: sqlite3.Connection = db._conn
        self._now = now
        self._lock = asyncio.Lock()
        # A read-only connection cannot take the write lock that BEGIN IMMEDIATE asks for.
        self._begin = "BEGIN" if readonly else "BEGIN IMMEDIATE"
        self._commits = 0
        self._checkpointer = None if readonly else _Checkpointer(uri, self._lock)
        self._queued: list[_Queued[Any]] = []
        self._grouping: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, path: Path, *, now: Callable[[], datetime] = lambda: datetime.now(UTC), readonly: bool = False
    ) -> Ledger:
        """Open (creating and migrating unless ``readonly``) the ledger at ``path``."""
        if readonly and not await asyncio.to_thread(path.is_file):
            # Checked here: a failed aiosqlite connect can race the closing of the caller's event loop.
            raise LedgerError(f"cannot open the ledger at {path}: no such file")
        uri = _uri(path, readonly=readonly)
        try:
            db = await aiosqlite.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger at {path}: {exc}") from exc
        db.row_factory = sqlite3.Row
        try:
            await db.execute("PRAGMA foreign_keys = ON")
            if not readonly:
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = NORMAL")
                await db.execute("PRAGMA wal_autocheckpoint = 0")
            await _migrate(db, path, readonly=readonly)
        except BaseException:
            await db.close()
            raise
        return cls(db, uri, now, readonly=readonly)

    async def close(self) -> None:
        if self._grouping is not None:
            await asyncio.shield(self._grouping)
        if self._checkpointer is not None:
            await self._checkpointer.close()
        async with self._lock:
            await self._db.close()

    def now(self) -> datetime:
        """The ledger's clock, without a transaction: for checks that need the time and no record."""
        return self._now()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One serialised transaction (``BEGIN IMMEDIATE``); commits on success, rolls back on any error."""
        async with self._lock:
            try:
                self._conn.execute(self._begin)
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger is unavailable: {exc}") from exc
            try:
                yield Transaction(self._conn, self._now())
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back already (I/O error, full disk)
                    self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise LedgerError(f"ledger commit failed: {exc}") from exc
            self._commits += 1
            if self._commits % CHECKPOINT_EVERY == 0 and self._checkpointer is not None:
                self._checkpointer.start()

    async def grouped(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        """``work``'s result once its writes are committed, sharing the commit with concurrent work.

        ``work`` runs in a transaction with the other work queued meanwhile, in
        queue order, inside a savepoint of its own: if it raises, its writes are
        undone and the exception comes back here, the others are unaffected.
        Work queued by a caller that is then cancelled still runs.
        """
        queued: _Queued[T] = _Queued(work, asyncio.get_running_loop().create_future())
        self._queued.append(queued)
        if self._grouping is None:
            self._grouping = asyncio.create_task(self._run_groups())
        return await queued.outcome

    async def _run_groups(self) -> None:
        try:
            while self._queued:
                group, self._queued = self._queued[:GROUP_LIMIT], self._queued[GROUP_LIMIT:]
                try:
                    async with self.transaction() as tx:
                        done = [
                            (queued, await _in_savepoint(self._conn, queued.work, tx)) for queued in group
                        ]
                # BEGIN or COMMIT failed, or we are cancelled: none of the group happened.
                except BaseException as exc:
                    for queued in group:
                        if not queued.outcome.done():
                            queued.outcome.set_exception(exc if isinstance(exc, Exception) else _closed())
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for queued, (result, error) in done:
                    if queued.outcome.done():  # its caller was cancelled; the work is done all the same
                        continue
                    if error is None:
                        queued.outcome.set_result(result)
                    else:
                        queued.outcome.set_exception(error)
        finally:
            self._grouping = None


class _Checkpointer:
    """Copies the WAL into the database and fsyncs, in a worker thread, on a connection of its own.

    A checkpoint copies the WAL in passes while transactions go on, then what they wrote during the
    last pass holding the ledger's lock: a WAL that is wholly copied with no writer busy starts over at the
    next commit, where one always copied beside writers would grow without end (measured: 320 MB
    in half a minute at 2,000 reports/s, and every page lookup slower for it).
    """

    def __init__(self, uri: str, lock: asyncio.Lock) -> None:
        self._uri = uri
        self._lock = lock
        self._conn: sqlite3.Connection | None = None
        self._running: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        """Start a checkpoint unless one is still running (that one will do) or the ledger is closing."""
        if not self._closing and (self._running is None or self._running.done()):
            self._running = asyncio.create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        # Passes beside the writers until one finds little written since the last, then that little.
        seen = 0
        for _ in range(CHECKPOINT_PASSES):
            frames = await asyncio.to_thread(self._copy)
            if frames is None or frames - seen < CATCH_UP_FRAMES:
                break
            seen = frames
        async with self._lock:
            await asyncio.to_thread(self._copy)

    async def close(self) -> None:
        """Finish: the last checkpoint runs with no writer. Call before taking the ledger's lock."""
        self._closing = True
        if self._running is not None:
            await asyncio.wait([self._running])
        async with self._lock:
            await asyncio.to_thread(self._copy)
            if self._conn is not None:
                self._conn.close()

    def _copy(self) -> int | None:
        """One checkpoint pass; the number of frames in the WAL (None if it failed)."""
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(
                    self._uri, uri=True, isolation_level=None, check_same_thread=False
                )
            # Fetched to the end: a statement left open would keep a read transaction on the WAL.
            ((_busy, frames, _copied),) = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            logger.warning("WAL checkpoint failed (retried later): %s", exc)
            return None
        return int(frames)


def _closed() -> LedgerError:
    return LedgerError("the ledger is closing")


@dataclass(frozen=True)
class _Queued(Generic[T]):
    work: Callable[[Transaction], Awaitable[T]]
    outcome: asyncio.Future[T]


async def _in_savepoint(
    db: sqlite3.Connection, work: Callable[[Transaction], Awaitable[T]], tx: Transaction
) -> tuple[T | None, Exception | None]:
    """Run ``work`` in a savepoint; on an exception undo its writes and return the exception."""
    db.execute("SAVEPOINT work")
    try:
        result = await work(tx)
    except Exception as exc:
        db.execute("ROLLBACK TO work")
        db.execute("RELEASE work")
        tx._undone()
        return None, exc
    db.execute("RELEASE work")
    return result, None


def _uri(path: Path, *, readonly: bool) -> str:
    """An SQLite URI: read-only opening must not create the file."""
    return f"{path.absolute().as_uri()}?mode={'ro' if readonly else 'rwc'}"


async def _migrate(db: aiosqlite.Connection, path: Path, *, readonly: bool) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {path} has schema v{version}, newer than this custodian's v{SCHEMA_VERSION}"
        )
    if version < SCHEMA_VERSION and readonly:
        raise LedgerError(f"ledger {path} has schema v{version}; start the custodian once to migrate it")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        logger.info("migrating ledger %s to schema v%d", path, target)
        await db.executescript(
            f"BEGIN IMMEDIATE;\n{MIGRATIONS[target - 1]}\nPRAGMA user_version = {target};\nCOMMIT;"
        )
