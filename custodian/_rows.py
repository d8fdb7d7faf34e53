"""Rows of the ledger's tables to records and back (timestamps are stored as POSIX seconds).

Both backends' rows (``sqlite3.Row``, ``asyncpg.Record``) are read by column name.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Protocol

from custodian.audit import AuditEntry
from custodian.quota import Account, Allotment
from custodian.records import DeploymentRecord, InstanceRecord, LeaseRecord, ModelRecord, ReceiptRecord
from enclave.receipts import TokenCounts


class Row(Protocol):
    """A fetched row, read by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


def ts(value: datetime) -> float:
    return value.timestamp()


def dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def model_row(r: Row) -> ModelRecord:
    return ModelRecord(
        model_id=bytes(r["model_id"]),
        name=r["name"],
        sha384=bytes(r["sha384"]),
        size=r["size"],
        chunk_size=r["chunk_size"],
        chunk_count=r["chunk_count"],
        wrapped_key=bytes(r["wrapped_key"]),
        created_at=dt(r["created_at"]),
        inputs=r["inputs"],
        kind=r["kind"],
    )


def deployment_row(r: Row) -> DeploymentRecord:
    account = Account(
        balance=r["balance"],
        granted=r["granted"],
        revoked=r["revoked"],
        used=r["used"],
        overdrawn=r["overdrawn"],
        unreported=r["unreported"],
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
        created_at=dt(r["created_at"]),
        zeroize_after_seconds=r["zeroize_after"],
    )


def instance_row(r: Row) -> InstanceRecord:
    return InstanceRecord(
        instance_id=r["instance_id"],
        deployment=r["deployment"],
        platform=r["platform"],
        public_key=bytes(r["public_key"]),
        enrolled_at=dt(r["enrolled_at"]),
        last_seen=dt(r["last_seen"]),
        last_seq=r["last_seq"],
    )


def lease_row(r: Row) -> LeaseRecord:
    return LeaseRecord(
        lease_id=r["lease_id"],
        instance_id=r["instance_id"],
        deployment=r["deployment"],
        units=Allotment(limit=r["lim"], peak=r["peak"], used=r["used"], unreported=r["unreported"]),
        state=r["state"],
        expires_at=dt(r["expires_at"]),
        tokens=TokenCounts(r["prompt_tokens"], r["completion_tokens"]),
    )


def receipt_row(r: Row) -> ReceiptRecord:
    return ReceiptRecord(
        instance_id=r["instance_id"],
        seq=r["seq"],
        lease_id=r["lease_id"],
        used=r["used"],
        body=bytes(r["body"]),
        signature=bytes(r["signature"]),
        digest=bytes(r["digest"]),
        received_at=dt(r["received_at"]),
    )


def audit_row(r: Row) -> AuditEntry:
    return AuditEntry(
        seq=r["seq"],
        at=r["at"],
        actor=r["actor"],
        action=r["action"],
        subject=r["subject"],
        detail=json.loads(r["detail"]),
        hash=bytes(r["hash"]),
    )
