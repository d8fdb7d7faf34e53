"""The ledger: models, deployments, instances, leases, receipts and the audit log, on one of two backends.

The interface is small on purpose: ``Ledger.transaction()`` yields a
``Transaction`` whose methods read and write whole records
(``custodian.records``). ``Ledger.open(database)`` picks the backend:

- a path: SQLite (``custodian._ledger_sqlite``), the embedded default, one
  custodian process per file;
- a ``postgresql://`` URL: PostgreSQL (``custodian._ledger_postgres``), shared
  by several custodian replicas.

The record methods' SQL is written once (``custodian._transaction``, ``?``
placeholders); a backend supplies the statement primitives, the audit chain's
head and the transactions. Every change happens in one transaction together with its audit
entry, and transactions that write are serialised (SQLite's ``BEGIN
IMMEDIATE``; on PostgreSQL the audit chain's head row, locked first by every
writing transaction on every replica), so a record read in a transaction is
the record the transaction overwrites: no update is ever lost. Frequent small
changes (usage reports) share a commit: ``Ledger.grouped(work)`` queues
``work`` and runs everything queued meanwhile in one transaction, each piece
inside its own savepoint, so a piece that raises undoes only its own writes;
nobody hears back before the commit. On PostgreSQL that also means one lock of
the chain's head serves the whole group.

The audit log and the receipts are append-only (triggers refuse updates and
deletes); the audit log is hash-chained (``custodian.audit``).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from custodian._schema import MIGRATIONS
from custodian._transaction import Transaction
from custodian.audit import AuditEntry, AuditValue
from custodian.config import is_postgres_url
from custodian.errors import LedgerError
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
    "is_postgres_url",
]

SCHEMA_VERSION = len(MIGRATIONS)

# Most pieces of work one grouped commit carries (``Ledger.grouped``).
GROUP_LIMIT = 256

T = TypeVar("T")


class Ledger(ABC):
    """A ledger on one backend; transactions that write are serialised."""

    def __init__(self, now: Callable[[], datetime]) -> None:
        self._now = now
        self._commits = 0
        self._queued: list[_Queued[Any]] = []
        self._grouping: asyncio.Task[None] | None = None

    @staticmethod
    async def open(
        database: str | Path,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        readonly: bool = False,
    ) -> Ledger:
        """Open (creating and migrating unless ``readonly``) the ledger at ``database``.

        ``database`` is an SQLite file's path, or a ``postgresql://`` URL.
        """
        if is_postgres_url(database):
            from custodian._ledger_postgres import PostgresLedger  # asyncpg is imported only when used

            return await PostgresLedger.connect(str(database), now=now, readonly=readonly)
        from custodian._ledger_sqlite import SqliteLedger

        return await SqliteLedger.connect(Path(database), now=now, readonly=readonly)

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """One serialised transaction; commits on success, rolls back on any error."""

    @abstractmethod
    async def _savepoint(self, tx: Transaction, statement: str) -> None:
        """Run a SAVEPOINT, ROLLBACK TO or RELEASE statement in ``tx``."""

    def now(self) -> datetime:
        """The ledger's clock, without a transaction: for checks that need the time and no record."""
        return self._now()

    async def runs_singletons(self) -> bool:
        """Whether this process is the one to run the jobs that must run once (the lease sweep).

        One SQLite custodian always is; among replicas, one at a time is.
        """
        return True

    async def _finish_groups(self) -> None:
        """Wait for the grouped work already queued (call first in ``close``)."""
        if self._grouping is not None:
            await asyncio.shield(self._grouping)

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
                        done = [(queued, await self._in_savepoint(queued.work, tx)) for queued in group]
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

    async def _in_savepoint(
        self, work: Callable[[Transaction], Awaitable[T]], tx: Transaction
    ) -> tuple[T | None, Exception | None]:
        """Run ``work`` in a savepoint; on an exception undo its writes and return the exception."""
        await self._savepoint(tx, "SAVEPOINT work")
        try:
            result = await work(tx)
        except Exception as exc:
            await self._savepoint(tx, "ROLLBACK TO SAVEPOINT work")
            await self._savepoint(tx, "RELEASE SAVEPOINT work")
            tx._undone()
            return None, exc
        await self._savepoint(tx, "RELEASE SAVEPOINT work")
        return result, None


def _closed() -> LedgerError:
    return LedgerError("the ledger is closing")


@dataclass(frozen=True)
class _Queued(Generic[T]):
    work: Callable[[Transaction], Awaitable[T]]
    outcome: asyncio.Future[T]
