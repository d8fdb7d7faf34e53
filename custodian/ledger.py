"""The ledger: models, deployments, instances, leases and the audit log in SQLite.

This is the only module that touches the database (through ``aiosqlite``). Its
interface is small on purpose: ``Ledger.transaction()`` yields a
``Transaction`` whose methods read and write whole records, so another backend
(PostgreSQL, for several custodian replicas) can take its place.

Every change happens in one ``BEGIN IMMEDIATE`` transaction together with its
audit entry. The audit log is append-only (triggers refuse updates and
deletes) and hash-chained: entry ``n`` stores ``SHA-256(hash(n-1) ||
canonical JSON of entry n)``, which ``verify_audit`` recomputes. The schema
(``custodian._schema``) is versioned with ``PRAGMA user_version`` and migrated
forward on open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from custodian._schema import MIGRATIONS
from custodian.errors import ConflictError, LedgerError
from custodian.quota import Account, Allotment
from enclave.attestation.claims import canonical_json

logger = logging.getLogger(__name__)

AuditValue = str | int | bool
LEASE_STATES = ("active", "closed", "expired")
_GENESIS = bytes(32)

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class ModelRecord:
    model_id: bytes
    name: str
    sha384: bytes
    size: int
    chunk_size: int
    chunk_count: int
    # The data key, wrapped by the custodian's key-encryption key.
    wrapped_key: bytes
    created_at: datetime


@dataclass(frozen=True)
class DeploymentRecord:
    name: str
    model_id: bytes
    manifest: str
    token_sha256: bytes
    offline_grace_seconds: int
    lease_size: int
    suspended: bool
    account: Account
    created_at: datetime


@dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    deployment: str
    platform: str
    public_key: bytes  # SubjectPublicKeyInfo, DER
    enrolled_at: datetime
    last_seen: datetime
    last_seq: int

    @property
    def key_sha256(self) -> str:
        return hashlib.sha256(self.public_key).hexdigest()


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    instance_id: str
    deployment: str
    units: Allotment
    state: str
    expires_at: datetime

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: str
    actor: str
    action: str
    subject: str
    detail: Mapping[str, AuditValue]
    hash: bytes

    def body(self) -> bytes:
        return canonical_json(
            {
                "seq": self.seq,
                "at": self.at,
                "actor": self.actor,
                "action": self.action,
                "subject": self.subject,
                "detail": dict(self.detail),
            }
        )


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


class Transaction:
    """Reads and writes of whole records inside one ledger transaction."""

    def __init__(self, db: aiosqlite.Connection, now: datetime) -> None:
        self._db = db
        self.now = now

    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        async with self._db.execute(sql, params) as cursor:
            row: sqlite3.Row | None = await cursor.fetchone()
            return row

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        async with self._db.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def _insert(self, what: str, sql: str, params: tuple[Any, ...]) -> None:
        try:
            await self._db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"{what} already exists") from exc

    # ------------------------------------------------------------------ models

    async def add_model(self, m: ModelRecord) -> None:
        await self._insert(
            f"model {m.name!r}",
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                m.model_id,
                m.name,
                m.sha384,
                m.size,
                m.chunk_size,
                m.chunk_count,
                m.wrapped_key,
                _ts(m.created_at),
            ),
        )

    async def model(self, name: str) -> ModelRecord | None:
        row = await self._one("SELECT * FROM models WHERE name = ?", (name,))
        return _model(row) if row else None

    async def model_by_id(self, model_id: bytes) -> ModelRecord | None:
        row = await self._one("SELECT * FROM models WHERE model_id = ?", (model_id,))
        return _model(row) if row else None

    async def models(self) -> list[ModelRecord]:
        return [_model(r) for r in await self._all("SELECT * FROM models ORDER BY name")]

    # ------------------------------------------------------------- deployments

    async def add_deployment(self, d: DeploymentRecord) -> None:
        a = d.account
        await self._insert(
            f"deployment {d.name!r}",
            "INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                _ts(d.created_at),
            ),
        )

    async def update_deployment(self, d: DeploymentRecord) -> None:
        """Write the mutable fields: token, suspension and the account."""
        a = d.account
        await self._db.execute(
            "UPDATE deployments SET token_sha256 = ?, suspended = ?, balance = ?, granted = ?, revoked = ?,"
            " used = ?, overdrawn = ? WHERE name = ?",
            (d.token_sha256, d.suspended, a.balance, a.granted, a.revoked, a.used, a.overdrawn, d.name),
        )

    async def deployment(self, name: str) -> DeploymentRecord | None:
        row = await self._one("SELECT * FROM deployments WHERE name = ?", (name,))
        return _deployment(row) if row else None

    async def deployments(self) -> list[DeploymentRecord]:
        return [_deployment(r) for r in await self._all("SELECT * FROM deployments ORDER BY name")]

    # -------------------------------------------------------------- challenges

    async def add_challenge(self, nonce: bytes, deployment: str, expires_at: datetime) -> None:
        await self._insert(
            "challenge", "INSERT INTO challenges VALUES (?, ?, ?)", (nonce, deployment, _ts(expires_at))
        )

    async def take_challenge(self, nonce: bytes) -> tuple[str, datetime] | None:
        """Remove the challenge and return its deployment and expiry, or None if there is none."""
        row = await self._one(
            "DELETE FROM challenges WHERE nonce = ? RETURNING deployment, expires_at", (nonce,)
        )
        return (row["deployment"], _dt(row["expires_at"])) if row else None

    async def pending_challenges(self) -> int:
        row = await self._one("SELECT count(*) AS n FROM challenges")
        return int(row["n"]) if row else 0

    async def purge_challenges(self) -> int:
        cursor = await self._db.execute("DELETE FROM challenges WHERE expires_at < ?", (_ts(self.now),))
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
                _ts(i.enrolled_at),
                _ts(i.last_seen),
                i.last_seq,
            ),
        )

    async def update_instance(self, i: InstanceRecord) -> None:
        """Write the mutable fields: last contact and last usage sequence."""
        await self._db.execute(
            "UPDATE instances SET last_seen = ?, last_seq = ? WHERE instance_id = ?",
            (_ts(i.last_seen), i.last_seq, i.instance_id),
        )

    async def instance(self, instance_id: str) -> InstanceRecord | None:
        row = await self._one("SELECT * FROM instances WHERE instance_id = ?", (instance_id,))
        return _instance(row) if row else None

    async def instances(self, deployment: str | None = None) -> list[InstanceRecord]:
        if deployment is None:
            rows = await self._all("SELECT * FROM instances ORDER BY enrolled_at, instance_id")
        else:
            rows = await self._all(
                "SELECT * FROM instances WHERE deployment = ? ORDER BY enrolled_at, instance_id",
                (deployment,),
            )
        return [_instance(r) for r in rows]

    # ------------------------------------------------------------------ leases

    async def add_lease(self, lease: LeaseRecord) -> None:
        u = lease.units
        await self._insert(
            f"lease for instance {lease.instance_id}",
            "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                lease.lease_id,
                lease.instance_id,
                lease.deployment,
                u.limit,
                u.peak,
                u.used,
                lease.state,
                _ts(lease.expires_at),
            ),
        )

    async def update_lease(self, lease: LeaseRecord) -> None:
        u = lease.units
        await self._db.execute(
            "UPDATE leases SET lim = ?, peak = ?, used = ?, state = ?, expires_at = ? WHERE lease_id = ?",
            (u.limit, u.peak, u.used, lease.state, _ts(lease.expires_at), lease.lease_id),
        )

    async def lease(self, lease_id: str) -> LeaseRecord | None:
        row = await self._one("SELECT * FROM leases WHERE lease_id = ?", (lease_id,))
        return _lease(row) if row else None

    async def active_lease(self, instance_id: str) -> LeaseRecord | None:
        row = await self._one(
            "SELECT * FROM leases WHERE instance_id = ? AND state = 'active'", (instance_id,)
        )
        return _lease(row) if row else None

    async def active_leases(self, deployment: str) -> list[LeaseRecord]:
        rows = await self._all(
            "SELECT * FROM leases WHERE deployment = ? AND state = 'active' ORDER BY rowid", (deployment,)
        )
        return [_lease(r) for r in rows]

    async def due_leases(self) -> list[LeaseRecord]:
        """Active leases whose expiry has passed."""
        rows = await self._all(
            "SELECT * FROM leases WHERE state = 'active' AND expires_at < ? ORDER BY rowid", (_ts(self.now),)
        )
        return [_lease(r) for r in rows]

    # ------------------------------------------------------------------- audit

    async def audit(self, actor: str, action: str, subject: str, detail: Mapping[str, AuditValue]) -> None:
        """Append one entry to the hash-chained audit log."""
        last = await self._one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        seq, previous = (last["seq"] + 1, bytes(last["hash"])) if last else (1, _GENESIS)
        entry = AuditEntry(seq, self.now.isoformat(), actor, action, subject, dict(detail), b"")
        digest = hashlib.sha256(previous + entry.body()).digest()
        await self._db.execute(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, entry.at, actor, action, subject, json.dumps(dict(detail), sort_keys=True), digest),
        )

    async def audit_entries(self, *, last: int | None = None) -> list[AuditEntry]:
        """The audit log in order, or only its ``last`` entries."""
        if last is None:
            rows = await self._all("SELECT * FROM audit ORDER BY seq")
        else:
            rows = await self._all(
                "SELECT * FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq", (last,)
            )
        return [_audit(r) for r in rows]

    async def verify_audit(self) -> int:
        """Recompute the whole chain; raise ``LedgerError`` at the first broken link. Returns the length."""
        previous = _GENESIS
        entries = await self.audit_entries()
        for expected_seq, entry in enumerate(entries, start=1):
            if entry.seq != expected_seq:
                raise LedgerError(f"audit log is missing entry {expected_seq}")
            if not hmac.compare_digest(hashlib.sha256(previous + entry.body()).digest(), entry.hash):
                raise LedgerError(f"audit log entry {entry.seq} does not match its hash chain")
            previous = entry.hash
        return len(entries)


def _model(r: sqlite3.Row) -> ModelRecord:
    return ModelRecord(
        model_id=bytes(r["model_id"]),
        name=r["name"],
        sha384=bytes(r["sha384"]),
        size=r["size"],
        chunk_size=r["chunk_size"],
        chunk_count=r["chunk_count"],
        wrapped_key=bytes(r["wrapped_key"]),
        created_at=_dt(r["created_at"]),
    )


def _deployment(r: sqlite3.Row) -> DeploymentRecord:
    account = Account(
        balance=r["balance"],
        granted=r["granted"],
        revoked=r["revoked"],
        used=r["used"],
        overdrawn=r["overdrawn"],
    )
    return DeploymentRecord(
        name=r["name"],
        model_id=bytes(r["model_id"]),
        manifest=r["manifest"],
        token_sha256=bytes(r["token_sha256"]),
        offline_grace_seconds=r["offline_grace"],
        lease_size=r["lease_size"],
        suspended=bool(r["suspended"]),
        account=account,
        created_at=_dt(r["created_at"]),
    )


def _instance(r: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        instance_id=r["instance_id"],
        deployment=r["deployment"],
        platform=r["platform"],
        public_key=bytes(r["public_key"]),
        enrolled_at=_dt(r["enrolled_at"]),
        last_seen=_dt(r["last_seen"]),
        last_seq=r["last_seq"],
    )


def _lease(r: sqlite3.Row) -> LeaseRecord:
    return LeaseRecord(
        lease_id=r["lease_id"],
        instance_id=r["instance_id"],
        deployment=r["deployment"],
        units=Allotment(limit=r["lim"], peak=r["peak"], used=r["used"]),
        state=r["state"],
        expires_at=_dt(r["expires_at"]),
    )


def _audit(r: sqlite3.Row) -> AuditEntry:
    return AuditEntry(
        seq=r["seq"],
        at=r["at"],
        actor=r["actor"],
        action=r["action"],
        subject=r["subject"],
        detail=json.loads(r["detail"]),
        hash=bytes(r["hash"]),
    )


class Ledger:
    """One SQLite database; transactions are serialised on one connection."""

    def __init__(
        self, db: aiosqlite.Connection, now: Callable[[], datetime], *, readonly: bool = False
    ) -> None:
        self._db = db
        self._now = now
        self._lock = asyncio.Lock()
        # A read-only connection cannot take the write lock that BEGIN IMMEDIATE asks for.
        self._begin = "BEGIN" if readonly else "BEGIN IMMEDIATE"

    @classmethod
    async def open(
        cls, path: Path, *, now: Callable[[], datetime] = lambda: datetime.now(UTC), readonly: bool = False
    ) -> Ledger:
        """Open (creating and migrating unless ``readonly``) the ledger at ``path``."""
        uri = _uri(path, readonly=readonly)
        try:
            db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger at {path}: {exc}") from exc
        db.row_factory = sqlite3.Row
        try:
            await db.execute("PRAGMA foreign_keys = ON")
            if not readonly:
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = FULL")
            await _migrate(db, path, readonly=readonly)
        except BaseException:
            await db.close()
            raise
        return cls(db, now, readonly=readonly)

    async def close(self) -> None:
        await self._db.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One serialised transaction (``BEGIN IMMEDIATE``); commits on success, rolls back on any error."""
        async with self._lock:
            try:
                await self._db.execute(self._begin)
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger is unavailable: {exc}") from exc
            try:
                yield Transaction(self._db, self._now())
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")


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
