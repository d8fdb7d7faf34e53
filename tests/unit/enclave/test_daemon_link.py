"""The custodian link against a fake gateway on real loopback TLS listeners."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from enclave._daemon.config import DaemonConfig
from enclave._daemon.enrolment import enrol
from enclave._daemon.errors import (
    CustodianCertificateError,
    CustodianUnreachableError,
    EnrolmentRefusedError,
    ModelRefusedError,
)
from enclave._daemon.lease import Lease
from enclave._daemon.link import Backoff, CustodianLink
from enclave._daemon.measured import MeasuredIdentity
from enclave._daemon.metrics import DaemonMetrics
from enclave.attestation import measurement
from enclave.attestation.sim import SimAttester
from tests.unit.enclave.fake_custodian import CertAuthority, FakeCustodian, FakeGateway
from tests.unit.enclave.tiny_model import tiny_classifier

MODEL = tiny_classifier().data


def make_config(gateway: FakeGateway, address: str, **overrides: object) -> DaemonConfig:
    config = DaemonConfig(
        custodian=address,
        custodian_ca_pem=gateway.custodian_ca.pem,
        deployment=gateway.deployment,
        join_token=gateway.token,
        listen="127.0.0.1:0",
        connect_timeout=2.0,
        call_timeout=5.0,
        report_interval=0.05,
        topup_wait=0.5,
        reconnect_initial=0.05,
        reconnect_max=0.2,
        intra_op_threads=1,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


def measured_identity(gateway: FakeGateway) -> MeasuredIdentity:
    identity = MeasuredIdentity(SimAttester(), gateway.deployment)
    identity.measure(measurement.code_event())
    identity.measure(measurement.config_event(gateway.custodian_ca.der))
    return identity


async def eventually(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Wait for ``condition`` (bounded, so a bug fails instead of hanging); no timing is asserted."""
    try:
        async with asyncio.timeout(limit):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for: {what}") from None


async def with_link(
    gateway: FakeGateway, body: Callable[[CustodianLink, FakeCustodian], Awaitable[None]]
) -> None:
    async with FakeCustodian(gateway) as custodian:
        config = make_config(gateway, custodian.address)
        identity = measured_identity(gateway)
        enrolment = await enrol(config, identity)
        link = CustodianLink(config, identity, enrolment, Lease(topup_wait=0.5), DaemonMetrics())
        link.model_sha384 = gateway.sha384  # as fetch_model would set it
        try:
            await body(link, custodian)
        finally:
            await link.close(final_report=False)


def test_enrol_passes_appraisal_and_model_opens_in_memory() -> None:
    gateway = FakeGateway(model=MODEL)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        assert list(gateway.instances) == [link.enrolment.instance_id]
        assert link.enrolment.gateway == f"127.0.0.1:{gateway.mtls_port}"
        pushed = await link.fetch_model()
        assert bytes(pushed.plaintext) == MODEL
        assert pushed.sha384 == gateway.sha384
        pushed.wipe()
        assert not any(pushed.plaintext)

    asyncio.run(with_link(gateway, body))
    assert gateway.enrol_refusals == []


@pytest.mark.parametrize("tamper", ["flip", "reorder", "truncate", "wrong-key"])
def test_tampered_model_push_is_refused(tamper: str) -> None:
    gateway = FakeGateway(model=MODEL, tamper=tamper)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        with pytest.raises(ModelRefusedError, match="model envelope failed authentication"):
            await link.fetch_model()

    asyncio.run(with_link(gateway, body))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param({"token": "another token"}, "join token is not valid", id="bad-token"),
        pytest.param({"deployment": "other"}, "unknown deployment", id="unknown-deployment"),
    ],
)
def test_enrolment_refusal_names_the_reason(change: dict[str, str], reason: str) -> None:
    gateway = FakeGateway(model=MODEL)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            config = make_config(
                gateway,
                custodian.address,
                join_token=change.get("token", gateway.token),
                deployment=change.get("deployment", gateway.deployment),
            )
            with pytest.raises(EnrolmentRefusedError, match=reason):
                await enrol(config, measured_identity(gateway))

    asyncio.run(run())


def test_enrolment_with_an_unmeasured_config_is_refused_by_appraisal() -> None:
    gateway = FakeGateway(model=MODEL)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            identity = MeasuredIdentity(SimAttester(), gateway.deployment)
            identity.measure(measurement.code_event())
            with pytest.raises(EnrolmentRefusedError, match="config events"):
                await enrol(make_config(gateway, custodian.address), identity)

    asyncio.run(run())


def test_unreachable_custodian_is_a_clear_error() -> None:
    gateway = FakeGateway(model=MODEL)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            address = custodian.address
            await custodian.stop()
            config = make_config(gateway, address, connect_timeout=0.3)
            with pytest.raises(CustodianUnreachableError, match="cannot reach the custodian"):
                await enrol(config, measured_identity(gateway))

    asyncio.run(run())


def test_a_wrong_custodian_ca_is_named_at_once_not_retried() -> None:
    """Issue 13 item 17: it was retried as "not reachable yet" for the whole connect timeout."""
    gateway = FakeGateway(model=MODEL)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            ca = CertAuthority("some other CA").pem
            config = make_config(gateway, custodian.address, custodian_ca_pem=ca, connect_timeout=600)
            with pytest.raises(CustodianCertificateError, match="does not chain to --custodian-ca"):
                async with asyncio.timeout(60):  # far less than the connect timeout: no retries
                    await enrol(config, measured_identity(gateway))

    asyncio.run(run())


def test_failed_report_is_retried_with_the_same_seq_and_used() -> None:
    gateway = FakeGateway(model=MODEL, fail_reports=2)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        await link.acquire_lease()
        lease = link.lease
        for _ in range(3):
            await lease.reserve()
            lease.commit()
        assert not await link.report()
        await lease.reserve()
        lease.commit()  # served while the report was pending: not in the retry
        assert not await link.report()
        assert await link.report()
        assert [(r.seq, r.used) for r in gateway.reports] == [(1, 3)]
        assert await link.report()  # the unit served meanwhile goes in a new report
        assert [(r.seq, r.used) for r in gateway.reports] == [(1, 3), (2, 4)]
        assert await link.report()  # nothing new: nothing sent
        assert len(gateway.reports) == 2
        # Every report carried the next receipt of the chain, signed with the identity key.
        assert [(r.seq, r.used) for r in gateway.receipts] == [(1, 3), (2, 4)]
        assert gateway.receipt_refusals == []

    asyncio.run(with_link(gateway, body))


def test_exhausted_lease_asks_for_a_top_up_and_serves_on() -> None:
    gateway = FakeGateway(model=MODEL, lease_size=2, balance=5)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        await link.acquire_lease()
        lease = link.lease
        assert lease.limit == 2
        for _ in range(2):
            await lease.reserve()
            lease.commit()
        runner = asyncio.ensure_future(link.run())
        try:
            await lease.reserve()  # waits for the top-up the reporter asks for
            lease.commit()
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert lease.limit == 4
        assert any(r.want_more for r in gateway.reports)

    asyncio.run(with_link(gateway, body))


def test_control_stream_applies_suspension_and_revocation() -> None:
    gateway = FakeGateway(model=MODEL)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        await link.acquire_lease()
        runner = asyncio.ensure_future(link.run())
        try:
            await eventually(lambda: link.connected, "connected")
            gateway.set_suspended(True)
            await eventually(lambda: link.lease.suspended, "suspended")
            gateway.set_suspended(False)
            await eventually(lambda: not link.lease.suspended, "resumed")
            gateway.revoke_all()
            await eventually(lambda: link.lease.limit == 0, "revoked")
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(with_link(gateway, body))


def test_lost_control_stream_reconnects_and_reacquires_the_lease() -> None:
    gateway = FakeGateway(model=MODEL)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        await link.acquire_lease()
        await link.lease.reserve()
        link.lease.commit()
        runner = asyncio.ensure_future(link.run())
        try:
            await eventually(lambda: gateway.watch_count == 1, "watching")
            gateway.drop_watch()
            await eventually(lambda: gateway.watch_count == 2, "watching again")
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert len(gateway.lease_requests) == 2
        assert gateway.lease_requests[1].lease_id == link.lease.lease_id
        # What was served before the loss is in a receipt, reported before the lease was asked again.
        assert [(r.lease, r.used) for r in gateway.receipts] == [(link.lease.lease_id, 1)]

    asyncio.run(with_link(gateway, body))


def test_final_report_closes_the_lease() -> None:
    gateway = FakeGateway(model=MODEL, balance=20, lease_size=10)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        await link.acquire_lease()
        for _ in range(3):
            await link.lease.reserve()
            link.lease.commit()
        await link.close(final_report=True)

    asyncio.run(with_link(gateway, body))
    final = gateway.reports[-1]
    assert (final.final, final.used) == (True, 3)
    assert gateway.balance == 17


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    backoff = Backoff(0.1, 1.0, random.Random(1))
    delays = [backoff.next() for _ in range(8)]
    caps = [min(1.0, 0.1 * 2**i) for i in range(8)]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    backoff.reset()
    assert backoff.next() <= 0.1


def test_a_replaced_lease_reports_its_last_units_before_the_new_one() -> None:
    gateway = FakeGateway(model=MODEL, balance=50, lease_size=10)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        lease = link.lease
        await link.acquire_lease()
        first = lease.lease_id
        for _ in range(2):
            await lease.reserve()
            lease.commit()
        assert await link.report()
        gateway.expire()
        await lease.reserve()
        lease.commit()  # served after the last report, before the custodian's new lease arrives
        await link.acquire_lease()
        assert lease.lease_id != first
        assert lease.retired == [(first, 3, None)]
        assert await link.report()
        await lease.reserve()
        lease.commit()
        assert await link.report()
        assert [(r.lease, r.used, r.seq) for r in gateway.receipts] == [
            (first, 2, 1),
            (first, 3, 2),
            (lease.lease_id, 1, 3),
        ]
        assert lease.retired == []
        assert gateway.old_leases[first].used == 3

    asyncio.run(with_link(gateway, body))


def test_a_refused_report_does_not_break_the_receipt_chain() -> None:
    gateway = FakeGateway(model=MODEL, balance=50, lease_size=10)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        await link.acquire_lease()
        await link.lease.reserve()
        link.lease.commit()
        link.model_sha384 = bytes(48)  # a receipt the custodian cannot accept
        assert not await link.report()
        assert gateway.receipt_refusals == ["binding"]
        link.model_sha384 = gateway.sha384
        await link.lease.reserve()
        link.lease.commit()
        assert await link.report()
        assert [(r.seq, r.used) for r in gateway.receipts] == [(1, 2)]

    asyncio.run(with_link(gateway, body))


def test_an_answered_top_up_without_units_is_no_failure() -> None:
    gateway = FakeGateway(model=MODEL, lease_size=2, balance=2)

    async def body(link: CustodianLink, custodian: FakeCustodian) -> None:
        await link.acquire_lease()
        lease = link.lease
        assert lease.topup_size == 2  # the deployment's lease size, from enrolment
        for _ in range(2):
            await lease.reserve()
            lease.commit()
        lease.topup_wanted.set()
        # Answered with no new units (the balance is empty): the reporter need not back off.
        assert await link.report()
        assert (lease.limit, lease.deployment_balance) == (2, 0)
        assert gateway.reports[-1].want_more

    asyncio.run(with_link(gateway, body))
