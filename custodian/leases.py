"""Leases: the blocks of inferences an enrolled instance may serve, and their usage reports.

The arithmetic is ``custodian.quota``, the receipt checks ``custodian.metering``;
this module applies them to the ledger, one transaction per call (usage reports
share theirs with concurrent reports, ``Ledger.grouped``), following
``docs/protocol.md`` (Quota) and the lease rules in the README:

- ``acquire`` returns the instance's active lease with its expiry refreshed,
  or opens one of ``min(lease_size, balance)`` units (0 while suspended).
- ``report`` acts on a usage report whose signed receipt is the next link of
  the instance's chain: it records the cumulative usage, tops the lease up
  (``want_more``) or closes it (``final``). A receipt for a lease that is no
  longer active settles it. A refused receipt changes nothing; it is counted,
  and a rate-limited sample per instance is written to the audit log with its
  reason.
- ``touch`` is the control stream's keep-alive; ``expire_due`` expires leases
  nobody refreshed within the offline grace and charges their unreported
  remainder; ``resume`` gives every active lease a fresh grace when the
  custodian starts.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from custodian import quota
from custodian.errors import InvalidRequestError, NotFoundError
from custodian.ledger import DeploymentRecord, InstanceRecord, LeaseRecord, Ledger, Transaction
from custodian.metering import (
    ReceiptRefusedError,
    UsageClaim,
    check_bounds,
    check_claim,
    receipt_detail,
    refusal_detail,
    verify_claim,
)
from custodian.metrics import CustodianMetrics
from custodian.throttle import AuditSampler, Rate
from enclave.receipts import Receipt

logger = logging.getLogger(__name__)

# Sequence numbers are stored as SQLite integers (signed 64-bit).
MAX_SEQ = 1 << 63
# Refused reports written to the audit log, per instance: a burst, then one per 5 s; the rest
# are counted (custos_custodian_audit_skipped_total{kind="receipt"}).
REFUSAL_SAMPLES = (10, 1 / 5)


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
    def __init__(
        self, ledger: Ledger, metrics: CustodianMetrics, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._ledger = ledger
        self._metrics = metrics
        burst, per_second = REFUSAL_SAMPLES
        self._refusals = AuditSampler(
            Rate(burst=burst, per_second=per_second, clock=monotonic),
            metrics.audit_skipped.labels("receipt").inc,
        )

    async def acquire(self, instance_id: str) -> LeaseView:
        """The instance's active lease (refreshed), or a new one."""
        async with self._ledger.transaction() as tx:
            instance, deployment = await _load(tx, instance_id)
            lease = await tx.active_lease(instance_id)
            if lease is None:
                deployment, lease = await self._open(tx, deployment, instance_id)
            else:
                lease = replace(lease, expires_at=_expiry(tx, deployment))
                await tx.update_lease(lease)
            await tx.update_deployment(deployment)
            await tx.update_instance(replace(instance, last_seen=tx.now))
            return lease_view(deployment, lease)

    async def report(self, instance: InstanceRecord, claim: UsageClaim) -> LeaseView:
        """Act on one usage report of ``instance`` (the authenticated caller: its id, deployment and
        key never change; the rest is read afresh); the reply carries its current lease (empty if none)."""
        _check_seq(claim.seq)
        instance_id = instance.instance_id
        try:
            # On the loop's thread: the signature check (about 70 µs) holds the GIL, so a worker
            # thread would only add the hand-over (measured: 11-14 % fewer reports/s that way).
            check_bounds(claim)
            receipt = verify_claim(claim, instance.public_key)
            # Reports arrive concurrently from every instance: they share commits.
            return await self._ledger.grouped(lambda tx: self._report(tx, instance_id, claim, receipt))
        except ReceiptRefusedError as exc:
            self._metrics.receipt_refusals.labels(exc.reason).inc()
            left_out = self._refusals.sample(instance_id)
            if left_out is None:
                raise
            detail = refusal_detail(instance_id, claim, exc)
            if left_out:
                detail["left_out"] = left_out
            # Shares a commit with the reports around it, as they do with each other.
            await self._ledger.grouped(
                lambda tx: tx.audit(_actor(instance_id), "receipt.refuse", instance.deployment, detail)
            )
            logger.warning(
                "usage report %d of instance %s refused: %s", claim.seq, instance_id, detail["detail"]
            )
            raise

    async def _report(
        self, tx: Transaction, instance_id: str, claim: UsageClaim, receipt: Receipt
    ) -> LeaseView:
        await tx.prefetch_report(instance_id, receipt.lease)
        instance, deployment = await _load(tx, instance_id)
        checked = await check_claim(tx, instance, deployment, claim, receipt)
        lease, last_seq = checked.lease, instance.last_seq
        if checked.receipt is not None:
            if receipt.tokens is not None:
                lease = replace(lease, tokens=receipt.tokens)
            await tx.add_receipt(checked.receipt)
            await tx.audit(_actor(instance_id), "receipt", deployment.name, receipt_detail(checked.receipt))
            last_seq = checked.receipt.seq
            if lease.active:
                deployment, lease = await self._record(tx, deployment, lease, claim.used)
                if claim.final:
                    deployment, lease = await self._close(tx, deployment, lease)
                elif claim.want_more and not deployment.suspended:
                    deployment, lease = await self._top_up(tx, deployment, lease)
            else:
                deployment, lease = await self._settle(tx, deployment, lease, claim.used)
        if lease.active:
            lease = replace(lease, expires_at=_expiry(tx, deployment))
        if lease.active or checked.receipt is not None:  # a retry for an ended lease changes nothing
            await tx.update_lease(lease)  # the helpers above change the record; it is written once, here
        await tx.update_deployment(deployment)
        await tx.update_instance(replace(instance, last_seen=tx.now, last_seq=last_seq))
        if checked.receipt is not None:
            self._metrics.receipts.inc()
        return lease_view(deployment, lease if lease.active else await tx.active_lease(instance_id))

    async def touch(self, instance_id: str, *, replica: str = "") -> LeaseView:
        """Keep-alive from the control stream: refresh the lease's expiry and the instance's last contact
        (and, among replicas, record that ``replica`` holds the stream)."""
        async with self._ledger.transaction() as tx:
            if replica:
                await tx.stream_seen(instance_id, replica)
            instance, deployment = await _load(tx, instance_id)
            lease = await tx.active_lease(instance_id)
            if lease is not None:
                lease = replace(lease, expires_at=_expiry(tx, deployment))
                await tx.update_lease(lease)
            await tx.update_instance(replace(instance, last_seen=tx.now))
            return lease_view(deployment, lease)

    async def expire_due(self) -> int:
        """Expire every active lease past its expiry, charging its unreported remainder."""
        async with self._ledger.transaction() as tx:
            due = await tx.due_leases()
            for lease in due:
                deployment = await tx.deployment(lease.deployment)
                if deployment is None:
                    continue
                account, units = quota.expire(deployment.account, lease.units)
                await tx.update_lease(replace(lease, units=units, state="expired"))
                await tx.update_deployment(replace(deployment, account=account))
                await tx.audit(
                    "custodian",
                    "lease.expire",
                    deployment.name,
                    {"lease": lease.lease_id, "used": units.used, "unreported": units.unreported},
                )
                self._metrics.leases_closed.labels("expired").inc()
                self._metrics.units_unreported.inc(units.unreported)
                logger.info(
                    "lease %s expired after %d reported units; %d unreported units charged",
                    lease.lease_id,
                    units.used,
                    units.unreported,
                )
            return len(due)

    async def resume(self) -> int:
        """At start: every active lease gets its grace from now (its instance could not reach us)."""
        async with self._ledger.transaction() as tx:
            leases = await tx.active_leases_all()
            for lease in leases:
                deployment = await tx.deployment(lease.deployment)
                if deployment is not None:
                    await tx.update_lease(
                        replace(lease, expires_at=max(lease.expires_at, _expiry(tx, deployment)))
                    )
            if leases:
                await tx.audit("custodian", "custodian.start", "", {"active_leases": len(leases)})
            return len(leases)

    async def _open(
        self, tx: Transaction, deployment: DeploymentRecord, instance_id: str
    ) -> tuple[DeploymentRecord, LeaseRecord]:
        size = 0 if deployment.suspended else deployment.lease_size
        account, units = quota.open_allotment(deployment.account, size)
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
            {"instance": instance_id, "lease": lease.lease_id, "limit": units.limit},
        )
        self._metrics.leases_opened.inc()
        logger.info("lease %s opened for instance %s: %d units", lease.lease_id, instance_id, units.limit)
        return replace(deployment, account=account), lease

    async def _record(
        self, tx: Transaction, deployment: DeploymentRecord, lease: LeaseRecord, used: int
    ) -> tuple[DeploymentRecord, LeaseRecord]:
        try:
            account, units = quota.record_use(deployment.account, lease.units, used)
        except InvalidRequestError as exc:
            raise ReceiptRefusedError("usage", str(exc)) from None
        return await self._apply_use(tx, deployment, lease, account, units, used)

    async def _apply_use(
        self,
        tx: Transaction,
        deployment: DeploymentRecord,
        lease: LeaseRecord,
        account: quota.Account,
        units: quota.Allotment,
        used: int,
    ) -> tuple[DeploymentRecord, LeaseRecord]:
        if account.overdrawn > deployment.account.overdrawn:
            overdrawn = account.overdrawn - deployment.account.overdrawn
            self._metrics.units_overdrawn.inc(overdrawn)
            logger.warning("lease %s used %d units its deployment could not cover", lease.lease_id, overdrawn)
        if used > lease.units.limit:
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
        return replace(deployment, account=account), replace(lease, units=units)

    async def _settle(
        self, tx: Transaction, deployment: DeploymentRecord, lease: LeaseRecord, used: int
    ) -> tuple[DeploymentRecord, LeaseRecord]:
        """A receipt for a closed or expired lease: the proven usage replaces any unreported charge."""
        try:
            account, units = quota.settle(deployment.account, lease.units, used)
        except InvalidRequestError as exc:
            raise ReceiptRefusedError("usage", str(exc)) from None
        refunded = lease.units.limit - units.limit if units.limit < lease.units.limit else 0
        if lease.units.unreported:
            await tx.audit(
                _actor(lease.instance_id),
                "lease.settle",
                deployment.name,
                {"lease": lease.lease_id, "used": used, "refunded": refunded},
            )
            logger.info("expired lease %s settled at %d units; %d returned", lease.lease_id, used, refunded)
        return await self._apply_use(tx, deployment, lease, account, units, used)

    async def _top_up(
        self, tx: Transaction, deployment: DeploymentRecord, lease: LeaseRecord
    ) -> tuple[DeploymentRecord, LeaseRecord]:
        account, units = quota.top_up(deployment.account, lease.units, deployment.lease_size)
        if units.limit > lease.units.limit:
            await tx.audit(
                _actor(lease.instance_id),
                "lease.top_up",
                deployment.name,
                {"lease": lease.lease_id, "limit": units.limit, "used": units.used},
            )
        return replace(deployment, account=account), replace(lease, units=units)

    async def _close(
        self, tx: Transaction, deployment: DeploymentRecord, lease: LeaseRecord
    ) -> tuple[DeploymentRecord, LeaseRecord]:
        account, units = quota.release(deployment.account, lease.units)
        lease = replace(lease, units=units, state="closed")
        await tx.audit(
            _actor(lease.instance_id),
            "lease.close",
            deployment.name,
            {"lease": lease.lease_id, "used": units.used},
        )
        self._metrics.leases_closed.labels("final").inc()
        logger.info("lease %s closed after %d units", lease.lease_id, units.used)
        return replace(deployment, account=account), lease


async def _load(tx: Transaction, instance_id: str) -> tuple[InstanceRecord, DeploymentRecord]:
    instance = await tx.instance(instance_id)
    deployment = await tx.deployment(instance.deployment) if instance else None
    if instance is None or deployment is None:
        raise NotFoundError(f"instance {instance_id} is not enrolled")
    return instance, deployment


def _check_seq(seq: int) -> None:
    if not 0 <= seq < MAX_SEQ:
        raise InvalidRequestError(f"sequence number {seq} is out of range")


def _expiry(tx: Transaction, deployment: DeploymentRecord) -> datetime:
    return tx.now + timedelta(seconds=deployment.offline_grace_seconds)


def _actor(instance_id: str) -> str:
    return f"enclave:{instance_id}"
