"""Leases against the ledger: open, refresh, report with receipts, top up, close, expire, settle, overrun."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from custodian.errors import InvalidRequestError, NotFoundError
from custodian.metering import ReceiptRefusedError, UsageClaim
from tests.unit.custodian.harness import custody, sample


def test_acquire_opens_one_lease_per_instance_and_refreshes_it(tmp_path: Path, ledger_db: str | Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=150, lease_size=100)
            instance, _ = await c.enrol("d", token)
            first = await c.leases.acquire(instance)
            assert (first.limit, first.deployment_balance, first.valid_for_seconds, first.suspended) == (
                100,
                50,
                30,
                False,
            )
            c.clock.advance(20)
            again = await c.leases.acquire(instance)
            assert again == first
            c.clock.advance(20)
            # Refreshed 20 s ago with a 30 s grace: not due yet.
            assert await c.leases.expire_due() == 0
            other, _ = await c.enrol("d", token)
            second = await c.leases.acquire(other)
            assert (second.limit, second.deployment_balance) == (50, 0)
            assert sample(c.metrics, "custos_custodian_leases_opened_total") == 2

    asyncio.run(scenario())


def test_a_suspended_deployment_leases_nothing(tmp_path: Path, ledger_db: str | Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=150)
            instance, enclave = await c.enrol("d", token)
            await c.deployments.suspend("d")
            lease = await c.leases.acquire(instance)
            assert (lease.limit, lease.suspended, lease.deployment_balance) == (0, True, 150)
            topped = await c.report(enclave, lease.lease_id, 0, want_more=True)
            assert topped.limit == 0

    asyncio.run(scenario())


def test_reports_are_cumulative_and_a_retried_receipt_counts_once(
    tmp_path: Path, ledger_db: str | Path
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=500, lease_size=100)
            instance, enclave = await c.enrol("d", token)
            lease = await c.leases.acquire(instance)
            receipt, signed = enclave.receipt(lease.lease_id, 40)
            claim = UsageClaim(lease.lease_id, receipt.seq, 40, want_more=False, final=False, receipt=signed)
            await c.leases.report(await c.caller(instance), claim)
            enclave.accepted(receipt)
            # The same receipt again (a retry after a lost reply) changes nothing.
            await c.leases.report(await c.caller(instance), claim)
            [usage] = await c.deployments.usage("d")
            assert (usage.used, usage.leased, usage.balance) == (40, 60, 400)
            # want_more: unused units back up to the lease size.
            topped = await c.report(enclave, lease.lease_id, 70, want_more=True)
            assert (topped.limit, topped.deployment_balance) == (170, 330)
            # final: the remainder returns to the balance; the instance holds no lease any more.
            closed = await c.report(enclave, lease.lease_id, 75, final=True)
            assert (closed.lease_id, closed.limit, closed.deployment_balance) == ("", 0, 425)
            [usage] = await c.deployments.usage("d")
            assert (usage.used, usage.leased, usage.balance, usage.granted_total) == (75, 0, 425, 500)
            fresh = await c.leases.acquire(instance)
            assert fresh.lease_id != lease.lease_id
            assert sample(c.metrics, "custos_custodian_units_used_total") == 75
            assert sample(c.metrics, "custos_custodian_receipts_total") == 3
            assert sample(c.metrics, "custos_custodian_leases_closed_total", how="final") == 1
            async with c.ledger.transaction() as tx:
                stored = [await tx.receipt(instance, seq) for seq in (1, 2, 3)]
                receipts = [e for e in await tx.audit_entries() if e.action == "receipt"]
            assert [r.used for r in stored if r] == [40, 70, 75]
            assert [e.detail["seq"] for e in receipts] == [1, 2, 3]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("used", "message"), [(5, "backwards"), (101, "above the lease limit")], ids=["backwards", "above-limit"]
)
def test_impossible_usage_is_refused_and_does_not_spend_the_sequence(
    tmp_path: Path, ledger_db: str | Path, used: int, message: str
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100)
            instance, enclave = await c.enrol("d", token)
            lease = await c.leases.acquire(instance)
            await c.report(enclave, lease.lease_id, 10)
            with pytest.raises(ReceiptRefusedError, match=message) as refused:
                await c.report(enclave, lease.lease_id, used)
            assert refused.value.reason == "usage"
            await c.report(enclave, lease.lease_id, 12)
            [usage] = await c.deployments.usage("d")
            assert usage.used == 12

    asyncio.run(scenario())


def test_an_unknown_instance_or_sequence_out_of_range_is_refused(
    tmp_path: Path, ledger_db: str | Path
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=10)
            instance, enclave = await c.enrol("d", token)
            lease = await c.leases.acquire(instance)
            with pytest.raises(NotFoundError):
                await c.leases.acquire("not-enrolled")
            _, signed = enclave.receipt(lease.lease_id, 1)
            with pytest.raises(InvalidRequestError, match="sequence"):
                await c.leases.report(
                    await c.caller(instance), UsageClaim(lease.lease_id, 2**63, 1, False, False, signed)
                )

    asyncio.run(scenario())


def test_an_unrefreshed_lease_is_charged_in_full_and_a_late_receipt_settles_it(
    tmp_path: Path, ledger_db: str | Path
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100, grace=30, lease_size=40)
            instance, enclave = await c.enrol("d", token)
            lease = await c.leases.acquire(instance)
            await c.report(enclave, lease.lease_id, 10)
            c.clock.advance(29)
            await c.leases.touch(instance)
            c.clock.advance(29)
            assert await c.leases.expire_due() == 0
            c.clock.advance(2)
            assert await c.leases.expire_due() == 1
            # Nothing returns: the 30 unreported units are charged, the declared worst case.
            [usage] = await c.deployments.usage("d")
            assert (usage.balance, usage.leased, usage.used, usage.unreported) == (60, 0, 10, 30)
            assert sample(c.metrics, "custos_custodian_units_unreported_total") == 30
            # The enclave was only cut off: it served 5 more before its own deadline and says so.
            late = await c.report(enclave, lease.lease_id, 15, want_more=True)
            assert (late.lease_id, late.deployment_balance) == ("", 85)
            [usage] = await c.deployments.usage("d")
            assert (usage.balance, usage.used, usage.unreported) == (85, 15, 0)
            async with c.ledger.transaction() as tx:
                actions = [e.action for e in await tx.audit_entries()]
            assert {"lease.expire", "lease.settle"} <= set(actions)
            assert sample(c.metrics, "custos_custodian_leases_closed_total", how="expired") == 1

    asyncio.run(scenario())


def test_usage_served_before_a_revoke_arrived_is_counted_even_past_the_balance(
    tmp_path: Path, ledger_db: str | Path
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100, lease_size=100)
            instance, enclave = await c.enrol("d", token)
            lease = await c.leases.acquire(instance)
            await c.report(enclave, lease.lease_id, 10)
            _, taken = await c.deployments.revoke("d", units=0, everything=True)
            assert taken == 90
            # The enclave had served 30 by the time the cut reached it.
            reply = await c.report(enclave, lease.lease_id, 30)
            assert (reply.limit, reply.deployment_balance) == (30, 0)
            [usage] = await c.deployments.usage("d")
            assert (usage.used, usage.balance) == (30, 0)
            assert sample(c.metrics, "custos_custodian_units_overdrawn_total") == 20
            with pytest.raises(ReceiptRefusedError, match="above the lease limit"):
                # Never past the most the enclave was ever told it may serve.
                await c.report(enclave, lease.lease_id, 101)

    asyncio.run(scenario())


def test_a_restarted_custodian_gives_active_leases_a_fresh_grace(
    tmp_path: Path, ledger_db: str | Path
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100, grace=30)
            instance, _ = await c.enrol("d", token)
            await c.leases.acquire(instance)
            # Down for longer than the grace: the instance could not have refreshed its lease.
            c.clock.advance(300)
            assert await c.leases.resume() == 1
            assert await c.leases.expire_due() == 0
            c.clock.advance(31)
            assert await c.leases.expire_due() == 1

    asyncio.run(scenario())


def test_concurrent_acquires_never_lease_more_than_the_balance(tmp_path: Path, ledger_db: str | Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=55, lease_size=10)
            instances = [(await c.enrol("d", token))[0] for _ in range(8)]
            leases = await asyncio.gather(*(c.leases.acquire(i) for i in instances))
            assert sorted(lease.limit for lease in leases) == [0, 0, 5, 10, 10, 10, 10, 10]
            [usage] = await c.deployments.usage("d")
            assert (usage.balance, usage.leased) == (0, 55)

    asyncio.run(scenario())
