"""A transaction on the PostgreSQL ledger: the record methods' statements, and what it keeps back.

Every statement is a round trip to the server, and a usage report reads and
writes some ten records: sent one by one they cost the custodian far more CPU
than the same report on SQLite. But a writing transaction holds the audit
chain's head lock from its first statement (``custodian._ledger_postgres``),
so nobody else changes a row meanwhile, and the transaction may keep what it
read and wrote:

- point reads (a deployment, an instance, a lease, the instance's active
  lease, a model) are served from what this transaction already read or wrote;
- updates of deployments, instances and leases, and new receipts and audit
  entries, are kept and sent at commit, each kind in one ``executemany``
  (one round trip); an update of an active lease is checked against the
  lease as this transaction knows it, as SQLite's conditional update checks it;
- any other statement first sends what was kept, so it sees every write.

A grouped piece of work (``Ledger.grouped``) gets a savepoint of what was kept,
restored if it fails; the database's own ``SAVEPOINT`` is sent only once the
piece runs a statement that writes. So a group of usage reports costs a few
reads per report and a handful of statements per group.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from custodian._postgres_kept import Kept, send
from custodian._rows import Row, deployment_row, dt, instance_row, lease_row, model_row, receipt_row, ts
from custodian.audit import AuditEntry, AuditValue
from custodian.errors import ConflictError, LedgerError, LedgerUnavailableError
from custodian.ledger import Transaction
from custodian.records import DeploymentRecord, InstanceRecord, LeaseRecord, ModelRecord, ReceiptRecord

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
        self._kept = Kept()
        # Receipts read from the table (they never change): a prefetched one serves its lookup.
        self._receipts_read: dict[tuple[str, int], ReceiptRecord] = {}
        # A grouped piece's savepoint: what was kept when it started, the head then, and whether
        # the database's SAVEPOINT was sent (only once the piece wrote something).
        self._mark: tuple[Kept, tuple[int, bytes] | None] | None = None
        self._mark_sent = False

    # ------------------------------------------------------------- statements

    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None:
        await self._send_kept()
        return await self._fetchrow(sql, params)

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        await self._send_kept()
        async with _postgres_errors("ledger statement failed"):
            rows: list[Row] = await self._conn.fetch(_sql(sql), *params)
        return rows

    async def _run(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        await self._send_kept()
        await self._savepoint_before_writing()
        async with _postgres_errors("ledger statement failed"):
            return _changed(await self._conn.execute(_sql(sql), *params))

    async def _fetchrow(self, sql: str, params: tuple[Any, ...]) -> Row | None:
        async with _postgres_errors("ledger statement failed"):
            row: Row | None = await self._conn.fetchrow(_sql(sql), *params)
        return row

    async def _insert(self, what: str, sql: str, params: tuple[Any, ...]) -> None:
        await self._send_kept()
        await self._savepoint_before_writing()
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

    # ------------------------------------------------ records kept until commit

    async def prefetch_report(self, instance_id: str, lease_id: str) -> None:
        """The instance, its deployment, the lease and the instance's last receipt, in one round trip."""
        if instance_id in self._kept.instances and lease_id in self._kept.leases:
            return
        row = await self._fetchrow(
            "SELECT i AS instance, d AS deployment, l AS lease, r AS receipt FROM instances i"
            " LEFT JOIN deployments d ON d.name = i.deployment"
            " LEFT JOIN leases l ON l.lease_id = ?"
            " LEFT JOIN receipts r ON r.instance_id = i.instance_id AND r.seq = i.last_seq"
            " WHERE i.instance_id = ?",
            (lease_id, instance_id),
        )
        if row is None:
            return
        # What this transaction already holds is newer than the table: keep it.
        instance = instance_row(row["instance"])
        self._kept.instances.setdefault(instance_id, instance)
        if row["deployment"] is not None:
            self._kept.deployments.setdefault(instance.deployment, deployment_row(row["deployment"]))
        if row["lease"] is not None and lease_id not in self._kept.leases:
            self._keep_lease(lease_row(row["lease"]))
        if row["receipt"] is not None:
            self._receipts_read[(instance_id, instance.last_seq)] = receipt_row(row["receipt"])

    async def deployment(self, name: str) -> DeploymentRecord | None:
        if name not in self._kept.deployments:
            row = await self._fetchrow("SELECT * FROM deployments WHERE name = ?", (name,))
            if row is None:
                return None
            self._kept.deployments[name] = deployment_row(row)
        return self._kept.deployments[name]

    async def update_deployment(self, d: DeploymentRecord) -> None:
        self._kept.deployments[d.name] = d
        self._kept.dirty_deployments.add(d.name)

    async def add_deployment(self, d: DeploymentRecord) -> None:
        await super().add_deployment(d)
        self._kept.deployments[d.name] = d

    async def instance(self, instance_id: str) -> InstanceRecord | None:
        if instance_id not in self._kept.instances:
            row = await self._fetchrow("SELECT * FROM instances WHERE instance_id = ?", (instance_id,))
            if row is None:
                return None
            self._kept.instances[instance_id] = instance_row(row)
        return self._kept.instances[instance_id]

    async def update_instance(self, i: InstanceRecord) -> None:
        self._kept.instances[i.instance_id] = i
        self._kept.dirty_instances.add(i.instance_id)

    async def add_instance(self, i: InstanceRecord) -> None:
        await super().add_instance(i)
        self._kept.instances[i.instance_id] = i
        self._kept.active[i.instance_id] = None

    async def model_by_id(self, model_id: bytes) -> ModelRecord | None:
        # Models are never kept back: no need to send anything before reading one.
        if model_id not in self._kept.models:
            row = await self._fetchrow("SELECT * FROM models WHERE model_id = ?", (model_id,))
            if row is None:
                return None
            self._kept.models[model_id] = model_row(row)
        return self._kept.models[model_id]

    async def lease(self, lease_id: str) -> LeaseRecord | None:
        if lease_id not in self._kept.leases:
            row = await self._fetchrow("SELECT * FROM leases WHERE lease_id = ?", (lease_id,))
            if row is None:
                return None
            self._keep_lease(lease_row(row))
        return self._kept.leases[lease_id]

    async def active_lease(self, instance_id: str) -> LeaseRecord | None:
        if instance_id not in self._kept.active:
            row = await self._fetchrow(
                "SELECT * FROM leases WHERE instance_id = ? AND state = 'active'", (instance_id,)
            )
            if row is None:
                self._kept.active[instance_id] = None
                return None
            self._keep_lease(lease_row(row))
        lease_id = self._kept.active[instance_id]
        return self._kept.leases[lease_id] if lease_id is not None else None

    def _keep_lease(self, lease: LeaseRecord) -> None:
        self._kept.leases[lease.lease_id] = lease
        if lease.active:
            self._kept.active[lease.instance_id] = lease.lease_id
        elif self._kept.active.get(lease.instance_id) == lease.lease_id:
            self._kept.active[lease.instance_id] = None

    async def add_lease(self, lease: LeaseRecord) -> None:
        await super().add_lease(lease)
        self._keep_lease(lease)

    async def update_lease(self, lease: LeaseRecord) -> None:
        known = await self.lease(lease.lease_id)
        if lease.active and (known is None or not known.active):
            raise LedgerError(
                f"lease {lease.lease_id} is not active in the ledger; a lease never becomes active again"
            )
        if known is None:
            return  # as an UPDATE of no row: nothing to write
        self._keep_lease(lease)
        self._kept.dirty_leases.add(lease.lease_id)

    async def stream_seen(self, instance_id: str, replica: str) -> None:
        self._kept.streams[instance_id] = (replica, ts(self.now))

    async def streams(self) -> dict[str, tuple[str, datetime]]:
        rows = await self._all("SELECT instance_id, replica, seen_at FROM control_streams")
        return {r["instance_id"]: (r["replica"], dt(r["seen_at"])) for r in rows}

    async def add_receipt(self, r: ReceiptRecord) -> None:
        key = (r.instance_id, r.seq)
        if key in self._kept.receipts:
            raise ConflictError(f"receipt {r.seq} of instance {r.instance_id} already exists")
        # A receipt already in the ledger would fail the commit (its primary key): the receipt
        # checks (custodian.metering) accept only the next sequence number, so none is.
        self._kept.receipts[key] = r

    async def receipt(self, instance_id: str, seq: int) -> ReceiptRecord | None:
        kept = self._kept.receipts.get((instance_id, seq)) or self._receipts_read.get((instance_id, seq))
        if kept is not None:
            return kept
        # The receipts kept back are the ones above: the table has every other.
        row = await self._fetchrow(
            "SELECT * FROM receipts WHERE instance_id = ? AND seq = ?", (instance_id, seq)
        )
        return receipt_row(row) if row else None

    async def audit(self, actor: str, action: str, subject: str, detail: Mapping[str, AuditValue]) -> None:
        if self._audit_head is None:
            raise LedgerError("a read-only ledger transaction cannot append to the audit log")
        seq, previous = self._audit_head[0] + 1, self._audit_head[1]
        entry = AuditEntry(seq, self.now.isoformat(), actor, action, subject, dict(detail), b"")
        digest = entry.chained_to(previous)
        text = json.dumps(dict(detail), sort_keys=True)
        self._kept.audit.append((seq, entry.at, actor, action, subject, text, digest))
        self._audit_head = (seq, digest)

    # ----------------------------------------------------- sending what was kept

    async def _send_kept(self) -> None:
        """Write what was kept, each kind in one round trip."""
        kept = self._kept
        if not kept.unsent:
            return
        await self._savepoint_before_writing()
        async with _postgres_errors("ledger statement failed"):
            await send(self._conn, kept)

    async def _before_commit(self) -> None:
        await self._send_kept()
        await self._write_head()

    # ---------------------------------------------------- a grouped piece's savepoint

    def _set_mark(self) -> None:
        self._mark, self._mark_sent = (self._kept.copy(), self._audit_head), False

    async def _savepoint_before_writing(self) -> None:
        if self._mark is not None and not self._mark_sent:
            async with _postgres_errors("ledger statement failed"):
                await self._conn.execute("SAVEPOINT work")
            self._mark_sent = True

    async def _roll_back_to_mark(self) -> None:
        if self._mark is None:
            return
        if self._mark_sent:
            async with _postgres_errors("ledger statement failed"):
                await self._conn.execute("ROLLBACK TO SAVEPOINT work")
                await self._conn.execute("RELEASE SAVEPOINT work")
            self._receipts_read.clear()  # some may have been written by the writes undone
        self._kept, self._audit_head = self._mark
        self._mark, self._mark_sent = None, False

    async def _release_mark(self) -> None:
        if self._mark_sent:
            async with _postgres_errors("ledger statement failed"):
                await self._conn.execute("RELEASE SAVEPOINT work")
        self._mark, self._mark_sent = None, False

    def _undone(self) -> None:
        """The savepoint's rollback restored what was kept, the audit head with it."""

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

    async def _write_head(self) -> None:
        if self._audit_head is not None and self._audit_head != self._locked_head:
            seq, digest = self._audit_head
            await self._conn.execute("UPDATE audit_head SET seq = $1, hash = $2", seq, digest)
