"""Zeroization: suspended past the grace, or no lease renewal for long, drops everything; enrol anew."""

from __future__ import annotations

import asyncio
import ssl

import grpc

from enclave._daemon.daemon import Daemon, Ready
from enclave.attestation.sim import SimAttester
from enclave.identity import ENCLAVE_TLS_NAME
from protos import custos_pb2, custos_pb2_grpc
from tests.unit.enclave.fake_custodian import FakeCustodian, FakeGateway
from tests.unit.enclave.test_daemon_link import eventually, make_config
from tests.unit.enclave.test_daemon_service import png
from tests.unit.enclave.tiny_model import tiny_classifier

TINY = tiny_classifier()


def _zeroized(daemon: Daemon, reason: str) -> float:
    value = daemon.metrics.registry.get_sample_value("custos_enclave_zeroizations_total", {"reason": reason})
    return value or 0.0


async def _infer(address: str) -> custos_pb2.InferResponse:
    """One inference over a channel pinned to whatever certificate the enclave presents now."""
    host, port = address.rsplit(":", 1)
    pem = (await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)))).encode()
    async with grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=pem),
        options=[("grpc.ssl_target_name_override", ENCLAVE_TLS_NAME)],
    ) as channel:
        return await custos_pb2_grpc.InferenceStub(channel).Infer(custos_pb2.InferRequest(image=png()))


async def _serving(
    gateway: FakeGateway, custodian: FakeCustodian
) -> tuple[Daemon, list[Ready], asyncio.Task[None]]:
    ready: list[Ready] = []
    daemon = Daemon(
        make_config(gateway, custodian.address, shutdown_grace=0.5), SimAttester(), on_ready=ready.append
    )
    task = asyncio.ensure_future(daemon.run())
    await eventually(lambda: bool(ready) or task.done(), "serving")
    if task.done():
        task.result()
    return daemon, ready, task


def test_suspended_past_the_grace_drops_the_model_and_enrols_again_after_resume() -> None:
    gateway = FakeGateway(model=TINY.data, grace=1)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            daemon, ready, task = await _serving(gateway, custodian)
            try:
                first = ready[0]
                await _infer(first.inference)
                old_key = daemon.identity.public_key_der
                gateway.set_suspended(True)
                await eventually(lambda: _zeroized(daemon, "suspended") == 1, "zeroized", limit=15)
                assert daemon.metrics.registry.get_sample_value("custos_enclave_model_loaded") == 0
                # It closed its lease on the way out, reporting the unit it served.
                final = gateway.reports[-1]
                assert (final.final, final.used) == (True, 1)
                # While suspended, it keeps asking to enrol and is told to wait.
                await eventually(lambda: gateway.challenges_refused >= 1, "enrolment refused while suspended")
                assert len(ready) == 1
                gateway.set_suspended(False)
                await eventually(lambda: len(ready) == 2, "enrolled again", limit=15)
                second = ready[1]
                assert second.instance_id != first.instance_id
                assert second.inference == first.inference
                assert daemon.identity.public_key_der != old_key
                assert [e.kind for e in daemon.identity.log] == ["instance", "code", "config", "model"]
                await _infer(second.inference)
            finally:
                daemon.request_stop()
                await task

    asyncio.run(run())


def test_no_lease_renewal_for_the_zeroize_time_drops_everything_until_the_custodian_returns() -> None:
    gateway = FakeGateway(model=TINY.data, grace=1, zeroize_after=2)

    async def run() -> None:
        custodian = FakeCustodian(gateway)
        await custodian.__aenter__()
        daemon, ready, task = await _serving(gateway, custodian)
        try:
            await _infer(ready[0].inference)
            await custodian.stop()
            await eventually(lambda: _zeroized(daemon, "offline") == 1, "zeroized", limit=15)
            assert daemon.service.model is None
            assert len(ready) == 1
            custodian = FakeCustodian(gateway, port=custodian.port)
            await custodian.__aenter__()
            await eventually(lambda: len(ready) == 2, "enrolled again", limit=20)
            assert ready[1].instance_id != ready[0].instance_id
            assert len(gateway.instances) == 2
            await _infer(ready[1].inference)
        finally:
            daemon.request_stop()
            await task
            await custodian.stop()

    asyncio.run(run())
