"""The ledger's transactions: reads and writes of whole records, their SQL written once for both backends.

A backend (``custodian._ledger_sqlite``, ``custodian._postgres_tx``) supplies
the statement primitives (``_one``, ``_all``, ``_run``, ``_insert``), the audit
chain's head, and whatever it does differently; ``custodian.ledger`` has the
interface that opens and runs them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from custodian._rows import (
    Row,
    audit_row,
    deployment_row,
    instance_row,
    lease_row,
    model_row,
    receipt_row,
    ts,
)
from custodian.audit import GENESIS, AuditEntry, AuditValue
from custodian.errors import LedgerError
from custodian.records import DeploymentRecord, InstanceRecord, LeaseRecord, ModelRecord, ReceiptRecord
from enclave.receipts import TokenCounts

# A replica whose clock runs behind the one purging still takes a challenge as unexpired for the
# difference: a spent one is kept this long past its expiry, so clock skew cannot reopen it.
SPENT_KEPT_PAST_EXPIRY = timedelta(minutes=10)


class Transaction(ABC):
    """Reads and writes of whole records inside one ledger transaction."""

    # How the leases of an instance or deployment are ordered by age, and where active leases are read.
    _LEASE_AGE = "rowid"
    _ACTIVE_LEASES = "leases"

    def __init__(self, now: datetime) -> None:
        self.now = now
        # The audit log's last (seq, hash) as this transaction left it; None: read it afresh.
        self._audit_head: tuple[int, bytes] | None = None

    # ------------------------------------------------------- backend primitives

    @abstractmethod
    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None: ...

    @abstractmethod
    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]: ...

    @abstractmethod
    async def _run(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run a statement that returns no rows; the number of rows it changed."""

    @abstractmethod
    async def _insert(self, what: str, sql: str, params: tuple[Any, ...]) -> None:
        """Run an INSERT; ``ConflictError`` naming ``what`` if the row already exists."""

    async def _read_audit_head(self) -> tuple[int, bytes]:
        """The audit log's last (seq, hash) before this transaction appends."""
        last = await self._one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return (int(last["seq"]), bytes(last["hash"])) if last else (0, GENESIS)

    def _undone(self) -> None:
        """Some of this transaction's writes were rolled back: forget what was kept of them."""
        self._audit_head = None

    # ------------------------------------------------------------------ models

    async def add_model(self, m: ModelRecord) -> None:
        await self._insert(
            f"model {m.name!r}",
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                m.kind,
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
        await self._run(
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
        changed = await self._run(
            "INSERT INTO spent_challenges VALUES (?, ?) ON CONFLICT DO NOTHING", (key, ts(expires_at))
        )
        return changed == 1

    async def purge_spent(self) -> int:
        """Forget spent challenges expired for longer than ``SPENT_KEPT_PAST_EXPIRY``."""
        return await self._run(
            "DELETE FROM spent_challenges WHERE expires_at < ?", (ts(self.now - SPENT_KEPT_PAST_EXPIRY),)
        )

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
        await self._run(
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
            "INSERT INTO leases (lease_id, instance_id, deployment, lim, peak, used, state, expires_at,"
            " unreported, prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                lease.tokens.prompt,
                lease.tokens.completion,
            ),
        )

    async def update_lease(self, lease: LeaseRecord) -> None:
        """Write the mutable fields: the units, the expiry and, when it leaves ``active``, the state.

        A lease never becomes active again, so an active lease's state is left alone: writing
        the column would rewrite both indexes on it at every usage report.
        """
        u, t = lease.units, lease.tokens
        if lease.active:
            changed = await self._run(
                "UPDATE leases SET lim = ?, peak = ?, used = ?, unreported = ?, expires_at = ?,"
                " prompt_tokens = ?, completion_tokens = ? WHERE lease_id = ? AND state = 'active'",
                (
                    u.limit,
                    u.peak,
                    u.used,
                    u.unreported,
                    ts(lease.expires_at),
                    t.prompt,
                    t.completion,
                    lease.lease_id,
                ),
            )
            if changed != 1:
                raise LedgerError(
                    f"lease {lease.lease_id} is not active in the ledger; a lease never becomes active again"
                )
            return
        await self._run(
            "UPDATE leases SET lim = ?, peak = ?, used = ?, unreported = ?, state = ?, expires_at = ?,"
            " prompt_tokens = ?, completion_tokens = ? WHERE lease_id = ?",
            (
                u.limit,
                u.peak,
                u.used,
                u.unreported,
                lease.state,
                ts(lease.expires_at),
                t.prompt,
                t.completion,
                lease.lease_id,
            ),
        )

    async def token_totals(self, deployment: str) -> TokenCounts:
        """A language model deployment's prompt and completion tokens, as its receipts prove them."""
        row = await self._one(
            "SELECT COALESCE(SUM(prompt_tokens), 0) AS prompt,"
            " COALESCE(SUM(completion_tokens), 0) AS completion FROM leases WHERE deployment = ?",
            (deployment,),
        )
        return TokenCounts(row["prompt"], row["completion"]) if row else TokenCounts()

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
            f"SELECT * FROM leases WHERE deployment = ? AND state = 'active' ORDER BY {self._LEASE_AGE}",  # noqa: S608 (class constants)
            (deployment,),
        )
        return [lease_row(r) for r in rows]

    async def due_leases(self) -> list[LeaseRecord]:
        """Active leases whose expiry has passed, through the index of active leases (one per instance)."""
        rows = await self._all(
            f"SELECT * FROM {self._ACTIVE_LEASES} WHERE state = 'active' AND expires_at < ?"  # noqa: S608 (class constants)
            f" ORDER BY {self._LEASE_AGE}",
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
            f"SELECT * FROM leases WHERE instance_id = ? ORDER BY {self._LEASE_AGE} DESC LIMIT 1",  # noqa: S608 (class constants)
            (instance_id,),
        )
        return lease_row(row) if row else None

    async def active_leases_all(self) -> list[LeaseRecord]:
        """Every active lease, through the index of them (see ``due_leases``)."""
        rows = await self._all(
            f"SELECT * FROM {self._ACTIVE_LEASES} WHERE state = 'active' ORDER BY {self._LEASE_AGE}"  # noqa: S608 (class constants)
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

    @abstractmethod
    async def prefetch_report(self, instance_id: str, lease_id: str) -> None:
        """A hint: a usage report of this instance for this lease is next. A backend whose every
        statement is a round trip may read what the report reads all at once."""

    # ----------------------------------------------------------- control pushes

    @abstractmethod
    async def notify(self, deployment: str) -> None:
        """Tell every replica, once this transaction commits, that ``deployment``'s state changed."""

    # ---------------------------------------------------- replicas' control streams

    @abstractmethod
    async def stream_seen(self, instance_id: str, replica: str) -> None:
        """Record that ``replica`` holds the instance's control stream now (replicas only)."""

    async def streams(self) -> dict[str, tuple[str, datetime]]:
        """Instance id -> (the replica that last held its control stream, when); empty for one custodian."""
        return {}

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
            self._audit_head = await self._read_audit_head()
        seq, previous = self._audit_head[0] + 1, self._audit_head[1]
        entry = AuditEntry(seq, self.now.isoformat(), actor, action, subject, dict(detail), b"")
        digest = entry.chained_to(previous)
        await self._run(
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
                "SELECT * FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) AS tail ORDER BY seq", (last,)
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
