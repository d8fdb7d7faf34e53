"""The ledger's SQLite backend: one file, one custodian process (``custodian.ledger`` has the interface).

This is the only module that touches SQLite (through ``aiosqlite``). Every
change happens in one ``BEGIN IMMEDIATE`` transaction together with its audit
entry.

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
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from custodian._rows import Row
from custodian._schema import MIGRATIONS
from custodian.errors import ConflictError, LedgerError
from custodian.ledger import SCHEMA_VERSION, Ledger, Transaction

logger = logging.getLogger(__name__)

# Commits between two WAL checkpoints (``_Checkpointer``).
CHECKPOINT_EVERY = 500
# A checkpoint makes at most this many passes beside the writers, and stops when a pass finds fewer
# new frames than CATCH_UP_FRAMES (4 MiB of pages): those are copied holding the lock.
CHECKPOINT_PASSES = 4
CATCH_UP_FRAMES = 1024


class SqliteTransaction(Transaction):
    """The record methods' statements, run at once on the caller's thread (see the module notes)."""

    # SQLite's planner scans the table of every lease ever held unless told to use the partial index.
    _ACTIVE_LEASES = "leases INDEXED BY one_active_lease"

    def __init__(self, db: sqlite3.Connection, now: datetime) -> None:
        super().__init__(now)
        self._db = db

    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        cursor = self._db.execute(sql, params)
        try:
            row: sqlite3.Row | None = cursor.fetchone()
        finally:
            cursor.close()
        return row

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        return self._db.execute(sql, params).fetchall()

    async def _run(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    async def _insert(self, what: str, sql: str, params: tuple[Any, ...]) -> None:
        try:
            self._db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"{what} already exists") from exc

    async def notify(self, deployment: str) -> None:
        """One custodian, no replica to tell: its own control bus is woken by the caller."""

    async def stream_seen(self, instance_id: str, replica: str) -> None:
        """One custodian: its own control bus knows which streams it holds."""

    async def prefetch_report(self, instance_id: str, lease_id: str) -> None:
        """Each statement is a few microseconds on this thread: nothing to gain."""


class SqliteLedger(Ledger):
    """One SQLite database; transactions are serialised on one connection."""

    def __init__(
        self, db: aiosqlite.Connection, uri: str, now: Callable[[], datetime], *, readonly: bool = False
    ) -> None:
        super().__init__(now)
        self._db = db
        # The same connection, for the statements run on the event loop's thread (see the module notes).
        self._conn: sqlite3.Connection = db._conn
        self._lock = asyncio.Lock()
        # A read-only connection cannot take the write lock that BEGIN IMMEDIATE asks for.
        self._begin = "BEGIN" if readonly else "BEGIN IMMEDIATE"
        self._checkpointer = None if readonly else _Checkpointer(uri, self._lock)

    @classmethod
    async def connect(
        cls, path: Path, *, now: Callable[[], datetime] = lambda: datetime.now(UTC), readonly: bool = False
    ) -> SqliteLedger:
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
        await self._finish_groups()
        if self._checkpointer is not None:
            await self._checkpointer.close()
        async with self._lock:
            await self._db.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One serialised transaction (``BEGIN IMMEDIATE``); commits on success, rolls back on any error."""
        async with self._lock:
            try:
                self._conn.execute(self._begin)
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger is unavailable: {exc}") from exc
            try:
                yield SqliteTransaction(self._conn, self._now())
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

    async def _savepoint(self, tx: Transaction, statement: str) -> None:
        self._conn.execute(statement)


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
