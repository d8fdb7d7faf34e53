"""Leases: the blocks of inferences an enrolled instance may serve, and their usage reports.

The arithmetic is ``custodian.quota``; this module applies it to the ledger,
one transaction per call, following ``docs/protocol.md`` (Quota):

- ``acquire`` returns the instance's active lease with its expiry refreshed,
  or opens one of ``min(lease_size, balance)`` units (0 while suspended).
- ``report`` records cumulative usage under a sequence number that must grow;
  a sequence already seen is a no-op that returns the current lease. It can
  also top the lease up (``want_more``) or close it (``final``).
- ``touch`` is the control stream's keep-alive; ``expire_due`` returns the
  unused units of leases nobody refreshed within the offline grace.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from custodian import quota
from custodian.errors import InvalidRequestError, NotFoundError
from custodian.ledger import DeploymentRecord, InstanceRecord, LeaseRecord, Ledger, Transaction
from custodian.metrics import CustodianMetrics

logger = logging.getLogger(__name__)

# Sequence numbers are stored as SQLite integers (signed 64-bit).
MAX_SEQ = 1 << 63


@dataclass(frozen=True)
class LeaseView:
    """What every lease reply and control event tells the enclave."""

    lease_id: str
    limit: int
    valid_for_seconds: int
    suspended: bool
    deployment_balance: int


def lease_view(deployment: DeploymentRecord, lease: LeaseRecord | None) -> LeaseView:
    return LeaseView(
        lease_id=lease.lease_id if lease else "",
        limit=lease.units.limit if lease else 0,
        valid_for_seconds=deployment.offline_grace_seconds,
        suspended=deployment.suspended,
        deployment_balance=deployment.account.balance,
    )


class Leases:
    def __init__(self, ledger: Ledger, metrics: CustodianMetrics) -> None:
        self._ledger = ledger
        self._metrics = metrics

    async def acquire(self, instance_id: str, *, lease_id: str, used: int, seq: int) -> LeaseView:
        """The instance's active lease (refreshed), or a new one; records ``used`` for ``lease_id`` first."""
        _check_seq(seq)
        async with self._ledger.transaction() as tx:
            instance, deployment = await _load(tx, instance_id)
            if lease_id and seq > instance.last_seq:
                lease = await _own_lease(tx, instance, lease_id)
                deployment, _ = await self._record(tx, deployment, lease, used)
                instance = replace(instance, last_seq=seq)
            active = await tx.active_lease(instance_id)
            if active is None:
                size = 0 if deployment.suspended else deployment.lease_size
                account, units = quota.open_allotment(deployment.account, size)
                deployment = replace(deployment, account=account)
                lease = LeaseRecord(
                    lease_id=uuid.uuid4().hex,
                    instance_id=instance_id,
                    deployment=deployment.name,
                    units=units,
                    state="active",
                    expires_at=_expiry(tx, deployment),
                )
                await tx.add_lease(lease)
                await tx.audit(
                    _actor(instance_id),
                    "lease.open",
                    deployment.name,
                    {"lease": lease.lease_id, "limit": units.limit},
                )
                self._metrics.leases_opened.inc()
                logger.info(
                    "lease %s opened for instance %s: %d units", lease.lease_id, instance_id, units.limit
                )
            else:
                lease = replace(active, expires_at=_expiry(tx, deployment))
                await tx.update_lease(lease)
            await tx.update_deployment(deployment)
            await tx.update_instance(replace(instance, last_seen=tx.now))
            return lease_view(deployment, lease)

    async def report(
        self, instance_id: str, *, lease_id: str, seq: int, used: int, want_more: bool, final: bool
    ) -> LeaseView:
        _check_seq(seq)
        async with self._ledger.transaction() as tx:
            instance, deployment = await _load(tx, instance_id)
            lease = await _own_lease(tx, instance, lease_id)
            if seq > instance.last_seq:
                deployment, lease = await self._record(tx, deployment, lease, used)
                instance = replace(instance, last_seq=seq)
                if lease.active and final:
                    deployment, lease = await self._close(tx, deployment, lease, "closed")
                elif lease.active and want_more and not deployment.suspended:
                    account, units = quota.top_up(deployment.account, lease.units, deployment.lease_size)
                    if units.limit > lease.units.limit:
                        await tx.audit(
                            _actor(instance_id),
                            "lease.top_up",
                            deployment.name,
                            {"lease": lease.lease_id, "limit": units.limit, "used": units.used},
                        )
                    deployment, lease = replace(deployment, account=account), replace(lease, units=units)
            if lease.active:
                lease = replace(lease, expires_at=_expiry(tx, deployment))
            await tx.update_lease(lease)
            await tx.update_deployment(deployment)
            await tx.update_instance(replace(instance, last_seen=tx.now))
            return lease_view(deployment, lease)

    async def touch(self, instance_id: str) -> LeaseView:
        """Keep-alive from the control stream: refresh the lease's expiry and the instance's last contact."""
        async with self._ledger.transaction() as tx:
            instance, deployment = await _load(tx, instance_id)
            lease = await tx.active_lease(instance_id)
            if lease is not None:
                lease = replace(lease, expires_at=_expiry(tx, deployment))
                await tx.update_lease(lease)
            await tx.update_instance(replace(instance, last_seen=tx.now))
            return lease_view(deployment, lease)

    async def expire_due(self) -> int:
        """Expire every active lease past its expiry; its unused units return to the balance."""
        async with self._ledger.transaction() as tx:
            due = await tx.due_leases()
            for lease in due:
                deployment = await tx.deployment(lease.deployment)
                if deployment is None:
                    continue
                deployment, _ = await self._close(tx, deployment, lease, "expired")
                await tx.update_deployment(deployment)
            return len(due)

    async def _record(
        self, tx: Transaction, deployment: DeploymentRecord, lease: LeaseRecord, used: int
    ) -> tuple[DeploymentRecord, LeaseRecord]:
        account, units = quota.record_use(deployment.account, lease.units, used)
        if account.overdrawn > deployment.account.overdrawn:
            overdrawn = account.overdrawn - deployment.account.overdrawn
            self._metrics.units_overdrawn.inc(overdrawn)
            logger.warning("lease %s used %d units its deployment could not cover", lease.lease_id, overdrawn)
        if units.limit > lease.units.limit:
            await tx.audit(
                _actor(lease.instance_id),
                "lease.overrun",
                deployment.name,
                {
                    "lease": lease.lease_id,
                    "used": used,
                    "limit": lease.units.limit,
                    "overdrawn": account.overdrawn,
                },
            )
        self._metrics.units_used.inc(units.used - lease.units.used)
        lease = replace(lease, units=units)
        await tx.update_lease(lease)
        return replace(deployment, account=account), lease

    async def _close(
        self, tx: Transaction, deployment: DeploymentRecord, lease: LeaseRecord, state: str
    ) -> tuple[DeploymentRecord, LeaseRecord]:
        account, units = quota.release(deployment.account, lease.units)
        lease = replace(lease, units=units, state=state)
        await tx.update_lease(lease)
        actor = _actor(lease.instance_id) if state == "closed" else "custodian"
        action = "lease.close" if state == "closed" else "lease.expire"
        await tx.audit(actor, action, deployment.name, {"lease": lease.lease_id, "used": units.used})
        self._metrics.leases_closed.labels("final" if state == "closed" else "expired").inc()
        logger.info("lease %s %s after %d units", lease.lease_id, state, units.used)
        return replace(deployment, account=account), lease


async def _load(tx: Transaction, instance_id: str) -> tuple[InstanceRecord, DeploymentRecord]:
    instance = await tx.instance(instance_id)
    deployment = await tx.deployment(instance.deployment) if instance else None
    if instance is None or deployment is None:
        raise NotFoundError(f"instance {instance_id} is not enrolled")
    return instance, deployment


async def _own_lease(tx: Transaction, instance: InstanceRecord, lease_id: str) -> LeaseRecord:
    lease = await tx.lease(lease_id) if lease_id else None
    if lease is None or lease.instance_id != instance.instance_id:
        raise NotFoundError(f"no lease {lease_id!r} for this instance")
    return lease


def _check_seq(seq: int) -> None:
    if not 0 <= seq < MAX_SEQ:
        raise InvalidRequestError(f"sequence number {seq} is out of range")


def _expiry(tx: Transaction, deployment: DeploymentRecord) -> datetime:
    return tx.now + timedelta(seconds=deployment.offline_grace_seconds)


def _actor(instance_id: str) -> str:
    return f"enclave:{instance_id}"
