"""Issue 13 item 1: an enclave that meets a busy custodian enrols later instead of exiting; issue 15: an
unreachable replica passes the enrolment to the next address at once."""

from __future__ import annotations

import asyncio
import socket

from enclave._daemon.enrolment import enrol
from tests.unit.enclave.fake_custodian import FakeCustodian, FakeGateway
from tests.unit.enclave.test_daemon_link import MODEL, make_config, measured_identity


def _free_port() -> int:
    """A loopback port nothing listens on (bound a moment, then released)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        return int(taken.getsockname()[1])


def test_a_busy_custodian_is_asked_again_past_the_connect_timeout() -> None:
    # Busy for longer than connect_timeout (1 s) lasts at the backoff's ceiling (0.2 s): the
    # enclave must keep asking, since the custodian answers, rather than give up as unreachable.
    gateway = FakeGateway(model=MODEL, busy_answers=8)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            config = make_config(gateway, custodian.address, connect_timeout=1.0)
            enrolment = await enrol(config, measured_identity(gateway))
            assert list(gateway.instances) == [enrolment.instance_id]

    asyncio.run(run())
    assert gateway.busy_answers == 0


class _BusyAtFirstEnrol(FakeGateway):
    """Issues challenges as the fake does, and answers the first Enrol busy."""

    issued = 0

    async def GetChallenge(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        reply = await super().GetChallenge(request, context)
        self.issued += 1
        self.busy_answers = 1 if self.issued == 1 else 0
        return reply


def test_a_busy_answer_to_enrol_starts_again_from_a_fresh_challenge() -> None:
    gateway = _BusyAtFirstEnrol(model=MODEL)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            await enrol(make_config(gateway, custodian.address), measured_identity(gateway))

    asyncio.run(run())
    # The first challenge met a busy Enrol and was never spent; the second one enrolled.
    assert (gateway.issued, len(gateway.challenges), len(gateway.instances)) == (2, 1, 1)


def test_a_replica_that_is_gone_costs_one_failed_connection_not_the_connect_timeout() -> None:
    gateway = FakeGateway(model=MODEL)
    dead = f"127.0.0.1:{_free_port()}"

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            # Were the dead address retried for the connect timeout, this would not end in 60 s.
            config = make_config(gateway, f"{dead},{custodian.address}", connect_timeout=600.0)
            enrolment = await asyncio.wait_for(enrol(config, measured_identity(gateway)), 60)
            assert enrolment.custodian == custodian.address
            assert list(gateway.instances) == [enrolment.instance_id]

    asyncio.run(run())


def test_replicas_all_unreachable_at_first_are_waited_for_as_one_custodian_is() -> None:
    gateway = FakeGateway(model=MODEL)
    dead = f"127.0.0.1:{_free_port()}"
    port = _free_port()

    async def run() -> None:
        custodian = FakeCustodian(gateway, port=port)

        async def start_later() -> None:
            await asyncio.sleep(0.5)
            await custodian.__aenter__()

        starting = asyncio.ensure_future(start_later())
        config = make_config(gateway, f"127.0.0.1:{port},{dead}", connect_timeout=20.0)
        try:
            enrolment = await enrol(config, measured_identity(gateway))
            assert enrolment.custodian == f"127.0.0.1:{port}"
        finally:
            await starting
            await custodian.stop()

    asyncio.run(run())
