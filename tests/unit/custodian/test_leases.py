"""Leases against the ledger: open, refresh, report (idempotent), top up, close, expire, overrun."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from custodian.errors import InvalidRequestError, NotFoundError
from tests.unit.custodian.harness import custody, sample


def test_acquire_opens_one_lease_per_instance_and_refreshes_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=150, lease_size=100)
            instance, _ = await c.enrol("d", token)
            first = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            assert (first.limit, first.deployment_balance, first.valid_for_seconds, first.suspended) == (
                100,
                50,
                30,
                False,
            )
            c.clock.advance(20)
            again = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            assert again == first
            c.clock.advance(20)
            # Refreshed 20 s ago with a 30 s grace: not due yet.
            assert await c.leases.expire_due() == 0
            other, _ = await c.enrol("d", token)
            second = await c.leases.acquire(other, lease_id="", used=0, seq=0)
            assert (second.limit, second.deployment_balance) == (50, 0)
            assert sample(c.metrics, "custos_custodian_leases_opened_total") == 2

    asyncio.run(scenario())


def test_a_suspended_deployment_leases_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=150)
            instance, _ = await c.enrol("d", token)
            await c.deployments.suspend("d")
            lease = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            assert (lease.limit, lease.suspended, lease.deployment_balance) == (0, True, 150)
            topped = await c.leases.report(
                instance, lease_id=lease.lease_id, seq=1, used=0, want_more=True, final=False
            )
            assert topped.limit == 0

    asyncio.run(scenario())


def test_reports_are_cumulative_and_idempotent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=500, lease_size=100)
            instance, _ = await c.enrol("d", token)
            lease = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            await c.leases.report(
                instance, lease_id=lease.lease_id, seq=1, used=40, want_more=False, final=False
            )
            # A retried (or replayed) report with a seen sequence changes nothing.
            await c.leases.report(
                instance, lease_id=lease.lease_id, seq=1, used=90, want_more=True, final=True
            )
            [usage] = await c.deployments.usage("d")
            assert (usage.used, usage.leased, usage.balance) == (40, 60, 400)
            # want_more: unused units back up to the lease size.
            topped = await c.leases.report(
                instance, lease_id=lease.lease_id, seq=2, used=70, want_more=True, final=False
            )
            assert (topped.limit, topped.deployment_balance) == (170, 330)
            # final: the remainder returns to the balance.
            closed = await c.leases.report(
                instance, lease_id=lease.lease_id, seq=3, used=75, want_more=False, final=True
            )
            assert (closed.limit, closed.deployment_balance) == (75, 425)
            [usage] = await c.deployments.usage("d")
            assert (usage.used, usage.leased, usage.balance, usage.granted_total) == (75, 0, 425, 500)
            fresh = await c.leases.acquire(instance, lease_id="", used=0, seq=3)
            assert fresh.lease_id != lease.lease_id
            assert sample(c.metrics, "custos_custodian_units_used_total") == 75
            assert sample(c.metrics, "custos_custodian_leases_closed_total", how="final") == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("used", "message"), [(5, "backwards"), (101, "above the lease limit")], ids=["backwards", "above-limit"]
)
def test_impossible_usage_is_refused_and_does_not_spend_the_sequence(
    tmp_path: Path, used: int, message: str
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=100)
            instance, _ = await c.enrol("d", token)
            lease = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            await c.leases.report(
                instance, lease_id=lease.lease_id, seq=1, used=10, want_more=False, final=False
            )
            with pytest.raises(InvalidRequestError, match=message):
                await c.leases.report(
                    instance, lease_id=lease.lease_id, seq=2, used=used, want_more=False, final=False
                )
            await c.leases.report(
                instance, lease_id=lease.lease_id, seq=2, used=12, want_more=False, final=False
            )
            [usage] = await c.deployments.usage("d")
            assert usage.used == 12

    asyncio.run(scenario())


def test_a_lease_is_reported_only_by_its_own_instance(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=100)
            owner, _ = await c.enrol("d", token)
            intruder, _ = await c.enrol("d", token)
            lease = await c.leases.acquire(owner, lease_id="", used=0, seq=0)
            for instance, lease_id in ((intruder, lease.lease_id), (owner, "no-such-lease"), (owner, "")):
                with pytest.raises(NotFoundError):
                    await c.leases.report(
                        instance, lease_id=lease_id, seq=1, used=1, want_more=False, final=False
                    )
            with pytest.raises(NotFoundError):
                await c.leases.acquire("not-enrolled", lease_id="", used=0, seq=0)

    asyncio.run(scenario())


def test_an_unrefreshed_lease_expires_and_a_late_report_still_counts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=100, grace=30)
            instance, _ = await c.enrol("d", token)
            lease = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            await c.leases.report(
                instance, lease_id=lease.lease_id, seq=1, used=10, want_more=False, final=False
            )
            c.clock.advance(29)
            await c.leases.touch(instance)
            c.clock.advance(29)
            assert await c.leases.expire_due() == 0
            c.clock.advance(2)
            assert await c.leases.expire_due() == 1
            [usage] = await c.deployments.usage("d")
            assert (usage.balance, usage.leased, usage.used) == (90, 0, 10)
            # The enclave served 5 more before its own deadline and reports them on reconnecting.
            late = await c.leases.report(
                instance, lease_id=lease.lease_id, seq=2, used=15, want_more=True, final=False
            )
            assert (late.limit, late.deployment_balance) == (15, 85)
            [usage] = await c.deployments.usage("d")
            assert (usage.balance, usage.used) == (85, 15)
            async with c.ledger.transaction() as tx:
                actions = [e.action for e in await tx.audit_entries()]
            assert "lease.expire" in actions
            assert "lease.overrun" in actions
            assert sample(c.metrics, "custos_custodian_leases_closed_total", how="expired") == 1

    asyncio.run(scenario())


def test_usage_served_before_a_revoke_arrived_is_counted_even_past_the_balance(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=100, lease_size=100)
            instance, _ = await c.enrol("d", token)
            lease = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            await c.leases.report(
                instance, lease_id=lease.lease_id, seq=1, used=10, want_more=False, final=False
            )
            _, taken = await c.deployments.revoke("d", units=0, everything=True)
            assert taken == 90
            # The enclave had served 30 by the time the cut reached it.
            reply = await c.leases.report(
                instance, lease_id=lease.lease_id, seq=2, used=30, want_more=False, final=False
            )
            assert (reply.limit, reply.deployment_balance) == (30, 0)
            [usage] = await c.deployments.usage("d")
            assert usage.used == 30
            assert sample(c.metrics, "custos_custodian_units_overdrawn_total") == 20
            with pytest.raises(InvalidRequestError):
                # Never past the most the enclave was ever told it may serve.
                await c.leases.report(
                    instance, lease_id=lease.lease_id, seq=3, used=101, want_more=False, final=False
                )

    asyncio.run(scenario())


def test_acquire_records_the_old_lease_usage_first(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=300, lease_size=100)
            instance, _ = await c.enrol("d", token)
            lease = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            await c.leases.report(
                instance, lease_id=lease.lease_id, seq=1, used=20, want_more=False, final=True
            )
            again = await c.leases.acquire(instance, lease_id=lease.lease_id, used=25, seq=2)
            assert again.lease_id != lease.lease_id
            [usage] = await c.deployments.usage("d")
            assert usage.used == 25

    asyncio.run(scenario())


def test_sequence_numbers_past_the_ledgers_range_are_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=10)
            instance, _ = await c.enrol("d", token)
            lease = await c.leases.acquire(instance, lease_id="", used=0, seq=0)
            with pytest.raises(InvalidRequestError, match="sequence"):
                await c.leases.report(
                    instance, lease_id=lease.lease_id, seq=2**64 - 1, used=1, want_more=False, final=False
                )
            with pytest.raises(InvalidRequestError, match="sequence"):
                await c.leases.acquire(instance, lease_id=lease.lease_id, used=1, seq=2**63)

    asyncio.run(scenario())


def test_concurrent_acquires_never_lease_more_than_the_balance(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=55, lease_size=10)
            instances = [(await c.enrol("d", token))[0] for _ in range(8)]
            leases = await asyncio.gather(
                *(c.leases.acquire(i, lease_id="", used=0, seq=0) for i in instances)
            )
            assert sorted(lease.limit for lease in leases) == [0, 0, 5, 10, 10, 10, 10, 10]
            [usage] = await c.deployments.usage("d")
            assert (usage.balance, usage.leased) == (0, 55)

    asyncio.run(scenario())
