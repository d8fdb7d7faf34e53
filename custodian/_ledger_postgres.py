"""The ledger's PostgreSQL backend: one database shared by several custodian replicas.

This is the only module that touches PostgreSQL (through ``asyncpg``);
``custodian.ledger`` has the interface and the record methods' SQL.

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
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from custodian._rows import Row
from custodian._schema_postgres import MIGRATIONS
from custodian.errors import ConflictError, LedgerError, LedgerUnavailableError
from custodian.ledger import Ledger, Transaction

logger = logging.getLogger(__name__)

SCHEMA_VERSION = len(MIGRATIONS)
# Session advisory lock held while migrating (an arbitrary constant: "custos" in ASCII, then 1).
MIGRATION_LOCK = 0x637573746F7301
CONNECT_TIMEOUT_SECONDS = 10.0
# Session advisory lock of the replica that runs the jobs that must run once ("custos", then 2).
SINGLETON_LOCK = 0x637573746F7302
# The LISTEN/NOTIFY channel of control pushes; the payload is a deployment's name.
CONTROL_CHANNEL = "custos_control"

# What a lost or refused connection, or a server shutting down or starting, looks like to asyncpg.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)
_PLACEHOLDER = re.compile(r"\?")
_translated: dict[str, str] = {}


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "the PostgreSQL database"


def _sql(statement: str) -> str:
    """The statement with ``?`` placeholders numbered as PostgreSQL wants them (``$1``, ``$2``...)."""
    translated = _translated.get(statement)
    if translated is None:
        count = iter(range(1, statement.count("?") + 1))
        translated = _translated[statement] = _PLACEHOLDER.sub(lambda _: f"${next(count)}", statement)
    return translated


def _changed(status: str) -> int:
    """The row count of a command status such as ``UPDATE 1`` or ``INSERT 0 1``."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PostgresTransaction(Transaction):
    _LEASE_AGE = "age"

    def __init__(self, conn: asyncpg.Connection, now: datetime, head: tuple[int, bytes] | None) -> None:
        super().__init__(now)
        self._conn = conn
        self._audit_head = head
        # The head as locked: written back at commit if this transaction appended to the log.
        self._locked_head = head

    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None:
        async with _postgres_errors("ledger statement failed"):
            row: Row | None = await self._conn.fetchrow(_sql(sql), *params)
        return row

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        async with _postgres_errors("ledger statement failed"):
            rows: list[Row] = await self._conn.fetch(_sql(sql), *params)
        return rows

    async def _run(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        async with _postgres_errors("ledger statement failed"):
            return _changed(await self._conn.execute(_sql(sql), *params))

    async def _insert(self, what: str, sql: str, params: tuple[Any, ...]) -> None:
        # ON CONFLICT keeps the transaction usable after a duplicate, as SQLite's does.
        try:
            changed = _changed(await self._conn.execute(_sql(f"{sql} ON CONFLICT DO NOTHING"), *params))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise ConflictError(f"{what} conflicts with the ledger: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise LedgerUnavailableError(f"ledger is unavailable: {_reason(exc)}") from exc
        except asyncpg.PostgresError as exc:
            raise LedgerError(f"ledger statement failed: {_reason(exc)}") from exc
        if changed != 1:
            raise ConflictError(f"{what} already exists")

    async def notify(self, deployment: str) -> None:
        # Delivered at commit, to every session listening (custodian._control_postgres); never if rolled back.
        await self._run("SELECT pg_notify(?, ?)", (CONTROL_CHANNEL, deployment))

    # ------------------------------------------- what replicas share (custodian.replica)

    async def shared_keys(self) -> dict[str, tuple[bytes, bytes]]:
        """Every shared key by name: (the key wrapped by the master key, its certificate or b"")."""
        rows = await self._all("SELECT name, wrapped, certificate FROM shared_keys")
        return {r["name"]: (bytes(r["wrapped"]), bytes(r["certificate"])) for r in rows}

    async def add_shared_key(self, name: str, wrapped: bytes, certificate: bytes) -> None:
        await self._insert(
            f"shared key {name!r}", "INSERT INTO shared_keys VALUES (?, ?, ?)", (name, wrapped, certificate)
        )

    async def add_sealed_chunk(self, model_id: bytes, chunk: int, ciphertext: bytes) -> None:
        await self._insert(
            f"chunk {chunk} of model {model_id.hex()}",
            "INSERT INTO sealed_chunks VALUES (?, ?, ?, ?)",
            (model_id, chunk, ciphertext, self.now.timestamp()),
        )

    async def sealed_chunk(self, model_id: bytes, chunk: int) -> bytes | None:
        row = await self._one(
            "SELECT ciphertext FROM sealed_chunks WHERE model_id = ? AND chunk = ?", (model_id, chunk)
        )
        return bytes(row["ciphertext"]) if row else None

    async def remove_sealed(self, model_id: bytes) -> int:
        return await self._run("DELETE FROM sealed_chunks WHERE model_id = ?", (model_id,))

    async def remove_orphaned_chunks(self, written_before: float) -> int:
        """Chunks no model record names, written before ``written_before`` (older than any upload)."""
        return await self._run(
            "DELETE FROM sealed_chunks WHERE written_at < ?"
            " AND model_id NOT IN (SELECT model_id FROM models)",
            (written_before,),
        )

    async def _read_audit_head(self) -> tuple[int, bytes]:
        if self._locked_head is None:
            raise LedgerError("a read-only ledger transaction cannot append to the audit log")
        # A savepoint was rolled back: the head row is still locked by us, the log has the truth.
        return await super()._read_audit_head()

    async def _write_head(self) -> None:
        if self._audit_head is not None and self._audit_head != self._locked_head:
            seq, digest = self._audit_head
            await self._conn.execute("UPDATE audit_head SET seq = $1, hash = $2", seq, digest)


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
                async with _postgres_errors("ledger commit failed"):
                    await tx._write_head()
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
        assert isinstance(tx, PostgresTransaction)
        await tx._conn.execute(statement)


@asynccontextmanager
async def _postgres_errors(what: str) -> AsyncIterator[None]:
    """Database failures as ``LedgerError``; the caller's own errors pass unchanged."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise LedgerUnavailableError(f"ledger is unavailable: {_reason(exc)}") from exc
    except asyncpg.PostgresError as exc:
        raise LedgerError(f"{what}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


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
