"""What a PostgreSQL ledger transaction keeps back until commit, and how it sends it (``_postgres_tx``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

from custodian._rows import ts
from custodian.records import DeploymentRecord, InstanceRecord, LeaseRecord, ModelRecord, ReceiptRecord


@dataclass
class Kept:
    """What a transaction read and wrote and has not sent yet (see the module notes)."""

    deployments: dict[str, DeploymentRecord] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    leases: dict[str, LeaseRecord] = field(default_factory=dict)
    # Instance id -> its active lease's id, or None: it has none.
    active: dict[str, str | None] = field(default_factory=dict)
    models: dict[bytes, ModelRecord] = field(default_factory=dict)
    # Names and ids of the records above changed and not sent yet.
    dirty_deployments: set[str] = field(default_factory=set)
    dirty_instances: set[str] = field(default_factory=set)
    dirty_leases: set[str] = field(default_factory=set)
    receipts: dict[tuple[str, int], ReceiptRecord] = field(default_factory=dict)
    audit: list[tuple[Any, ...]] = field(default_factory=list)
    # Instance id -> (replica, seen at): control streams seen (custodian enclaves).
    streams: dict[str, tuple[str, float]] = field(default_factory=dict)

    @property
    def unsent(self) -> bool:
        return bool(
            self.dirty_deployments
            or self.dirty_instances
            or self.dirty_leases
            or self.receipts
            or self.audit
            or self.streams
        )

    def copy(self) -> Kept:
        return Kept(
            dict(self.deployments),
            dict(self.instances),
            dict(self.leases),
            dict(self.active),
            dict(self.models),
            set(self.dirty_deployments),
            set(self.dirty_instances),
            set(self.dirty_leases),
            dict(self.receipts),
            list(self.audit),
            dict(self.streams),
        )


async def send(conn: asyncpg.Connection, kept: Kept) -> None:
    """Write what was kept, each kind in one round trip (``executemany``), and forget it was unsent."""
    if kept.dirty_deployments:
        await conn.executemany(
            "UPDATE deployments SET token_sha256 = $1, suspended = $2, balance = $3, granted = $4,"
            " revoked = $5, used = $6, overdrawn = $7, unreported = $8 WHERE name = $9",
            [_deployment_update(kept.deployments[n]) for n in sorted(kept.dirty_deployments)],
        )
    if kept.dirty_instances:
        await conn.executemany(
            "UPDATE instances SET last_seen = $1, last_seq = $2 WHERE instance_id = $3",
            [
                (ts(i.last_seen), i.last_seq, i.instance_id)
                for i in (kept.instances[n] for n in sorted(kept.dirty_instances))
            ],
        )
    if kept.dirty_leases:
        leases = [kept.leases[n] for n in sorted(kept.dirty_leases)]
        # An active lease's state is left alone: writing it would touch the indexes on it.
        active = [_lease_update(lease) for lease in leases if lease.active]
        ended = [(*_lease_update(lease), lease.state) for lease in leases if not lease.active]
        if active:
            await conn.executemany(
                "UPDATE leases SET lim = $2, peak = $3, used = $4, unreported = $5, expires_at = $6,"
                " prompt_tokens = $7, completion_tokens = $8 WHERE lease_id = $1",
                active,
            )
        if ended:
            await conn.executemany(
                "UPDATE leases SET lim = $2, peak = $3, used = $4, unreported = $5, expires_at = $6,"
                " prompt_tokens = $7, completion_tokens = $8, state = $9 WHERE lease_id = $1",
                ended,
            )
    if kept.receipts:
        await conn.executemany(
            "INSERT INTO receipts VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [
                (
                    r.instance_id,
                    r.seq,
                    r.lease_id,
                    r.used,
                    r.body,
                    r.signature,
                    r.digest,
                    ts(r.received_at),
                )
                for r in kept.receipts.values()
            ],
        )
    if kept.streams:
        await conn.executemany(
            "INSERT INTO control_streams VALUES ($1, $2, $3) ON CONFLICT (instance_id)"
            " DO UPDATE SET replica = excluded.replica, seen_at = excluded.seen_at",
            [(i, replica, at) for i, (replica, at) in sorted(kept.streams.items())],
        )
    if kept.audit:
        await conn.executemany("INSERT INTO audit VALUES ($1, $2, $3, $4, $5, $6, $7)", kept.audit)
    kept.dirty_deployments.clear()
    kept.dirty_instances.clear()
    kept.dirty_leases.clear()
    kept.receipts.clear()
    kept.audit.clear()
    kept.streams.clear()


def _deployment_update(d: DeploymentRecord) -> tuple[Any, ...]:
    a = d.account
    return (
        d.token_sha256,
        d.suspended,
        a.balance,
        a.granted,
        a.revoked,
        a.used,
        a.overdrawn,
        a.unreported,
        d.name,
    )


def _lease_update(lease: LeaseRecord) -> tuple[Any, ...]:
    """(lease_id, lim, peak, used, unreported, expires_at, prompt_tokens, completion_tokens)."""
    u, t = lease.units, lease.tokens
    return (
        lease.lease_id,
        u.limit,
        u.peak,
        u.used,
        u.unreported,
        ts(lease.expires_at),
        t.prompt,
        t.completion,
    )
