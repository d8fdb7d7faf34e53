"""What only the PostgreSQL ledger has: replicas sharing it, migrations under a lock, a server that goes away.

The behaviour both backends share is tested on both (``ledger_db`` in test_ledger.py and the
service tests); here two ``Ledger`` objects on one database stand for two custodian replicas,
each with its own connection pool, their transactions interleaved on the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import asyncpg
import pytest

from custodian._control_postgres import ControlListener
from custodian._ledger_postgres import SCHEMA_VERSION, redact
from custodian.audit_stream import LedgerAudit, check_tail
from custodian.control import ControlBus
from custodian.errors import LedgerError
from custodian.ledger import Ledger, Transaction
from custodian.quota import Account
from tests.postgres_support import Postgres, start_postgres
from tests.unit.custodian.harness import Clock
from tests.unit.custodian.test_ledger import _deployment, _model


async def _sql(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def test_replicas_migrating_at_once_migrate_once(postgres: Postgres) -> None:
    url = postgres.new_database()

    async def scenario() -> None:
        ledgers = await asyncio.gather(*(Ledger.open(url, now=Clock()) for _ in range(4)))
        for ledger in ledgers:
            await ledger.close()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT version FROM custos_schema") == SCHEMA_VERSION
            assert await conn.fetchval("SELECT count(*) FROM custos_schema") == 1
            assert await conn.fetchval("SELECT count(*) FROM audit_head") == 1
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_two_replicas_writing_at_once_lose_no_update_and_keep_one_chain(postgres: Postgres) -> None:
    url = postgres.new_database()
    rounds = 40

    async def grant_one(tx: Transaction) -> None:
        # A read-modify-write of one row, as every quota change is.
        deployment = await tx.deployment("d")
        assert deployment is not None
        account = replace(deployment.account, balance=deployment.account.balance + 1)
        await tx.update_deployment(replace(deployment, account=replace(account, granted=account.granted + 1)))
        await tx.audit("test", "quota.grant", "d", {"units": 1})

    async def replica(ledger: Ledger) -> None:
        for i in range(rounds):
            if i % 2:
                await asyncio.gather(*(ledger.grouped(grant_one) for _ in range(3)))
            else:
                async with ledger.transaction() as tx:
                    await grant_one(tx)

    async def scenario() -> None:
        first = await Ledger.open(url, now=Clock())
        second = await Ledger.open(url, now=Clock())
        try:
            model = _model()
            async with first.transaction() as tx:
                await tx.add_model(model)
                await tx.add_deployment(replace(_deployment(model), account=Account()))
            await asyncio.gather(replica(first), replica(second))
            expected = 2 * (rounds // 2 + 3 * (rounds // 2))
            async with second.transaction() as tx:
                deployment = await tx.deployment("d")
            assert deployment is not None
            assert deployment.account.balance == deployment.account.granted == expected
            assert (await check_tail(LedgerAudit(first), None)).length == expected
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


def test_the_audit_log_and_receipts_are_append_only(postgres: Postgres) -> None:
    url = postgres.new_database()

    async def scenario() -> None:
        ledger = await Ledger.open(url, now=Clock())
        try:
            async with ledger.transaction() as tx:
                await tx.audit("admin", "a", "s", {})
        finally:
            await ledger.close()
        for statement in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit", "TRUNCATE audit"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await _sql(url, statement)
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await _sql(url, "TRUNCATE receipts")

    asyncio.run(scenario())


def test_a_newer_schema_is_refused_and_readonly_needs_a_migrated_one(postgres: Postgres) -> None:
    url = postgres.new_database()
    with pytest.raises(LedgerError, match="migrate"):
        asyncio.run(Ledger.open(url, readonly=True))

    async def newer() -> None:
        await (await Ledger.open(url)).close()
        await _sql(url, f"UPDATE custos_schema SET version = {SCHEMA_VERSION + 1}")
        await Ledger.open(url)

    with pytest.raises(LedgerError, match="newer"):
        asyncio.run(newer())


def test_a_readonly_ledger_reads_and_refuses_to_write(postgres: Postgres) -> None:
    url = postgres.new_database()

    async def scenario() -> None:
        writer = await Ledger.open(url, now=Clock())
        async with writer.transaction() as tx:
            await tx.audit("admin", "a", "s", {})
        await writer.close()
        reader = await Ledger.open(url, readonly=True)
        try:
            assert (await check_tail(LedgerAudit(reader), None)).length == 1
            with pytest.raises(LedgerError):
                async with reader.transaction() as tx:
                    await tx.audit("admin", "b", "s", {})
        finally:
            await reader.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "how",
    ["wrong-password", "no-server", "no-database"],
)
def test_a_database_it_cannot_open_is_named_without_its_password(postgres: Postgres, how: str) -> None:
    url = postgres.new_database()
    secret = postgres.password
    if how == "wrong-password":
        url = url.replace(secret, "not-the-password-0123")
        secret = "not-the-password-0123"
    elif how == "no-server":
        url = url.replace(f":{postgres.port}/", ":1/")
    else:
        url = url.rsplit("/", 1)[0] + "/absent"
    with pytest.raises(
        LedgerError, match="cannot open the ledger at postgresql://custos:\\*\\*\\*@"
    ) as caught:
        asyncio.run(Ledger.open(url))
    assert secret not in str(caught.value)
    assert caught.value.__cause__ is None or secret not in str(caught.value.__cause__)


def test_redact_hides_only_the_password() -> None:
    assert redact("postgresql://u:pw@h:5/db?sslmode=require") == "postgresql://u:***@h:5/db?sslmode=require"
    assert redact("postgresql://h/db") == "postgresql://h/db"
    assert redact("postgresql://u@h/db?password=pw&sslmode=require") == (
        "postgresql://u@h/db?password=***&sslmode=require"
    )
    assert redact("postgresql://u@h/db?sslpassword=S3CRET&sslmode=require") == (
        "postgresql://u@h/db?sslpassword=***&sslmode=require"
    )


@pytest.fixture
def own_cluster() -> Iterator[Postgres]:
    """A cluster of this test's own: it is stopped and started again."""
    cluster = start_postgres()
    try:
        yield cluster
    finally:
        cluster.close()


def test_a_restarted_database_fails_transactions_meanwhile_then_serves_again(own_cluster: Postgres) -> None:
    url = own_cluster.new_database()

    async def scenario() -> None:
        ledger = await Ledger.open(url, now=Clock())
        try:
            async with ledger.transaction() as tx:
                await tx.audit("admin", "before", "s", {})
            await asyncio.to_thread(own_cluster.stop_server)
            with pytest.raises(LedgerError, match="unavailable") as caught:
                async with ledger.transaction() as tx:
                    await tx.audit("admin", "lost", "s", {})
            assert own_cluster.password not in str(caught.value)
            with pytest.raises(LedgerError):
                await ledger.grouped(lambda tx: tx.audit("admin", "lost", "s", {}))
            await asyncio.to_thread(own_cluster.start_server)
            async with ledger.transaction() as tx:
                await tx.audit("admin", "after", "s", {})
            async with ledger.transaction() as tx:
                assert [e.action for e in await tx.audit_entries()] == ["before", "after"]
            assert (await check_tail(LedgerAudit(ledger), None)).length == 2
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_a_committed_change_wakes_every_replicas_streams_and_a_rolled_back_one_none(
    postgres: Postgres,
) -> None:
    url = postgres.new_database()

    async def notify_then_fail(ledger: Ledger) -> None:
        async with ledger.transaction() as tx:
            await tx.notify("d")
            raise RuntimeError("rolled back")

    async def scenario() -> None:
        ledger = await Ledger.open(url, now=Clock())
        bus = ControlBus()
        listener = ControlListener(url, bus)
        listener.start()
        try:
            await asyncio.wait_for(listener.listening.wait(), 10)
            with bus.subscribe("i", "d") as subscription, bus.subscribe("j", "other") as bystander:
                await subscription.wait(0)  # the wake-up every stream gets when the listener connects
                await bystander.wait(0)
                with pytest.raises(RuntimeError):
                    await notify_then_fail(ledger)
                assert not await subscription.wait(0.5)
                async with ledger.transaction() as tx:
                    await tx.notify("d")
                assert await subscription.wait(1.0)
                assert not await bystander.wait(0.2)
        finally:
            await listener.stop()
            await ledger.close()

    asyncio.run(scenario())


def test_the_listener_reconnects_after_a_restart_and_wakes_every_stream(own_cluster: Postgres) -> None:
    url = own_cluster.new_database()

    async def scenario() -> None:
        bus = ControlBus()
        listener = ControlListener(url, bus)
        listener.start()
        try:
            await asyncio.wait_for(listener.listening.wait(), 10)
            with bus.subscribe("i", "d") as subscription:
                await subscription.wait(0)
                await asyncio.to_thread(own_cluster.stop_server)
                await asyncio.to_thread(own_cluster.start_server)
                # Whatever was notified while it was away is lost: the stream reads its state again.
                assert await subscription.wait(15)
                await asyncio.wait_for(listener.listening.wait(), 10)
        finally:
            await listener.stop()

    asyncio.run(scenario())


def test_one_replica_at_a_time_runs_the_singletons_and_another_takes_over_when_it_goes(
    postgres: Postgres,
) -> None:
    url = postgres.new_database()

    async def scenario() -> None:
        first = await Ledger.open(url, now=Clock())
        second = await Ledger.open(url, now=Clock())
        try:
            assert await first.runs_singletons()
            assert not await second.runs_singletons()
            assert await first.runs_singletons()  # still held, by the same session
            await first.close()
            assert await second.runs_singletons()
        finally:
            await second.close()

    asyncio.run(scenario())
