"""The ledger's PostgreSQL backend: one database shared by several custodian replicas.

Only the ``_postgres`` modules import ``asyncpg``: this one (connections,
migrations, the transaction's lock), ``_postgres_tx`` and ``_postgres_kept``
(what a transaction reads and writes) and ``_control_postgres`` (LISTEN);
``custodian.ledger`` has the interface, ``custodian._transaction`` the record
methods' SQL.

Writers are serialised across replicas by the audit chain's head row
(``custodian._schema_postgres``): every transaction that writes locks it with
its first statement, so each later statement (``READ COMMITTED``) reads what
the last writer committed, and the record it writes back is the one it read.
That is the lock SQLite's ``BEGIN IMMEDIATE`` takes, now across machines; a
grouped commit (``Ledger.grouped``) takes it once for every usage report in the
group. Taking it first, before any row, also means there is one lock order and
no deadlock. Within one replica, transactions queue on an ``asyncio.Lock``
and run on one connection, kept open between them.

Schema migrations run under a session advisory lock: the first replica to
start migrates, the others wait for it and find nothing left to do.

A connection that fails (the database restarted, the network cut) makes the
transaction fail with ``LedgerError`` ("ledger is unavailable"), which callers
report as ``UNAVAILABLE``; nothing is acknowledged that was not committed. The
next transaction opens a new connection.

The database URL may hold a password: it is never logged nor put in an error
(``redact``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from custodian._postgres_tx import (
    _UNAVAILABLE,
    CONTROL_CHANNEL,
    PostgresTransaction,
    _postgres_errors,
    _reason,
)
from custodian._schema_postgres import MIGRATIONS
from custodian.errors import LedgerError, LedgerUnavailableError
from custodian.ledger import Ledger, Transaction

__all__ = ["CONTROL_CHANNEL", "PostgresLedger", "PostgresTransaction", "redact"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = len(MIGRATIONS)
# Session advisory lock held while migrating (an arbitrary constant: "custos" in ASCII, then 1).
MIGRATION_LOCK = 0x637573746F7301
CONNECT_TIMEOUT_SECONDS = 10.0
# Session advisory lock of the replica that runs the jobs that must run once ("custos", then 2).
SINGLETON_LOCK = 0x637573746F7302


def redact(url: str) -> str:
    """``url`` without its password (in the user part or a ``password=`` parameter), for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            netloc = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
        query = [(k, "***" if _secret_parameter(k) else v) for k, v in parse_qsl(parts.query)]
        return urlunsplit(parts._replace(query=urlencode(query, safe="*")))
    except ValueError:
        return "the PostgreSQL database"


def _secret_parameter(name: str) -> bool:
    """``password``, ``sslpassword`` and anything else named like a secret (libpq and asyncpg names)."""
    lowered = name.lower()
    return any(word in lowered for word in ("password", "secret", "token", "key"))


class PostgresLedger(Ledger):
    """A PostgreSQL database shared with other replicas; this replica's writers queue on one lock."""

    def __init__(
        self, conn: asyncpg.Connection, url: str, now: Callable[[], datetime], *, readonly: bool = False
    ) -> None:
        super().__init__(now)
        self._url = url
        self._where = redact(url)
        self._readonly = readonly
        self._lock = asyncio.Lock()
        self._conn: asyncpg.Connection | None = conn
        # The connection holding the singletons' lock (None: not held).
        self._singletons_on: asyncpg.Connection | None = None

    @classmethod
    async def connect(
        cls, url: str, *, now: Callable[[], datetime] = lambda: datetime.now(UTC), readonly: bool = False
    ) -> PostgresLedger:
        where = redact(url)
        try:
            conn = await _connect(url)
        except (*_UNAVAILABLE, asyncpg.PostgresError, ValueError) as exc:
            raise LedgerError(f"cannot open the ledger at {where}: {_reason(exc)}") from None
        try:
            await _migrate(conn, where, readonly=readonly)
        except BaseException:
            conn.terminate()
            raise
        return cls(conn, url, now, readonly=readonly)

    async def close(self) -> None:
        await self._finish_groups()
        async with self._lock:
            if self._conn is not None:
                await _close(self._conn)
            self._conn = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One transaction; a writing one first locks the audit chain's head (see the module notes)."""
        async with self._lock:
            conn = await self._connection()
            try:
                async with _postgres_errors("ledger is unavailable"):
                    if self._readonly:
                        await conn.execute("BEGIN READ ONLY")
                        head = None
                    else:
                        await conn.execute("BEGIN")
                        row = await conn.fetchrow("SELECT seq, hash FROM audit_head FOR UPDATE")
                        head = (int(row["seq"]), bytes(row["hash"]))
                tx = PostgresTransaction(conn, self._now(), head)
                try:
                    yield tx
                except BaseException:
                    await self._rollback(conn)
                    raise
                await tx._before_commit()
                async with _postgres_errors("ledger commit failed"):
                    await conn.execute("COMMIT")
                self._commits += 1
            except BaseException:
                await self._rollback(conn)
                raise

    async def runs_singletons(self) -> bool:
        """Whether this replica holds the singletons' advisory lock, taking it if it is free.

        A session lock on this replica's connection: it goes when the replica dies or loses the
        connection, and another replica takes it at its next sweep.
        """
        if self._readonly:
            return False
        async with self._lock:
            conn = await self._connection()
            if self._singletons_on is conn:
                return True
            async with _postgres_errors("ledger is unavailable"):
                held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", SINGLETON_LOCK))
            self._singletons_on = conn if held else None
            return held

    async def _connection(self) -> asyncpg.Connection:
        """The connection this replica's transactions run on, opened again if it was lost."""
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            try:
                self._conn = await _connect(self._url)
            except (*_UNAVAILABLE, asyncpg.PostgresError, ValueError) as exc:
                raise LedgerUnavailableError(f"ledger is unavailable: {_reason(exc)}") from None
        return self._conn

    async def _rollback(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed() or not conn.is_in_transaction():
            return
        try:
            await conn.execute("ROLLBACK")
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            logger.warning("rollback failed; the connection is dropped: %s", _reason(exc))
            conn.terminate()

    async def _savepoint(self, tx: Transaction, statement: str) -> None:
        # What a piece wrote is kept in the transaction (custodian._postgres_tx): so is its savepoint.
        assert isinstance(tx, PostgresTransaction)
        if statement.startswith("SAVEPOINT"):
            tx._set_mark()
        elif statement.startswith("ROLLBACK"):
            await tx._roll_back_to_mark()
        elif statement.startswith("RELEASE"):
            await tx._release_mark()


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_SECONDS, command_timeout=None)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=CONNECT_TIMEOUT_SECONDS)
    except (*_UNAVAILABLE, asyncpg.PostgresError):
        conn.terminate()


async def _schema_version(conn: asyncpg.Connection) -> int:
    if await conn.fetchval("SELECT to_regclass('custos_schema')") is None:
        return 0
    return int(await conn.fetchval("SELECT version FROM custos_schema"))


async def _migrate(conn: asyncpg.Connection, where: str, *, readonly: bool) -> None:
    """Bring the schema to ``SCHEMA_VERSION``; one replica at a time (an advisory lock)."""
    async with _postgres_errors(f"cannot open the ledger at {where}"):
        if readonly:
            version = await _schema_version(conn)
            _check_version(version, where)
            if version < SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger {where} has schema v{version}; start a custodian once to migrate it"
                )
            return
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            version = await _schema_version(conn)
            _check_version(version, where)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                logger.info("migrating ledger %s to schema v%d", where, target)
                async with conn.transaction():
                    if target == 1:
                        await conn.execute("CREATE TABLE custos_schema (version INTEGER NOT NULL)")
                        await conn.execute("INSERT INTO custos_schema VALUES (0)")
                    await conn.execute(MIGRATIONS[target - 1])
                    await conn.execute("UPDATE custos_schema SET version = $1", target)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


def _check_version(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {where} has schema v{version}, newer than this custodian's v{SCHEMA_VERSION}"
        )
