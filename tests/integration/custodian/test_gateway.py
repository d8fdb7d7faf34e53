"""The custodian over real gRPC on loopback: enrolment, model push, leases, control stream, refusals."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import socket
import stat
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import serialization

from custodian.authority import CertificateAuthority
from custodian.config import Address, CustodianConfig
from custodian.errors import ConfigError
from custodian.server import CustodianServer
from enclave.envelope import ModelOpener, unwrap_key
from enclave.identity import generate_identity_key
from protos import custos_pb2 as pb
from tests.integration.custodian.harness import onnx_model, running
from tests.unit.custodian.fake_enclave import FakeEnclave
from tests.unit.custodian.harness import Clock

pytestmark = pytest.mark.integration


async def _status(awaitable: Any) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("the call succeeded")


def test_an_enclave_enrols_fetches_the_model_and_meters_its_lease(tmp_path: Path) -> None:
    model = onnx_model(300_000)

    async def scenario() -> None:
        async with running(tmp_path, model_chunk_size=64 * 1024) as r:
            token = await r.lend("d", model=model, units=150, lease_size=100)
            enrolled, enclave, gateway = await r.enrol("d", token)
            assert enrolled.mtls_port == r.server.endpoints.gateway.port  # type: ignore[union-attr]
            assert (enrolled.offline_grace_seconds, enrolled.lease_size) == (30, 100)

            parts = [part async for part in gateway.FetchModel(pb.FetchModelRequest())]
            header = parts[0].header
            key = unwrap_key(header.wrapped_key, enclave.key, header.model_id + enrolled.instance_id.encode())
            opener = ModelOpener(
                key,
                header.model_id,
                size=header.plaintext_size,
                chunk_size=header.chunk_size,
                chunk_count=header.chunk_count,
                sha384=header.plaintext_sha384,
            )
            for part in parts[1:]:
                opener.add(part.chunk.index, part.chunk.final, part.chunk.ciphertext)
            assert bytes(opener.finish()) == model
            assert header.chunk_count == len(parts) - 1 == 5

            lease = await gateway.AcquireLease(pb.LeaseRequest())
            assert (lease.limit, lease.deployment_balance, lease.valid_for_seconds) == (100, 50, 30)
            enclave.instance_id, enclave.model_sha384 = enrolled.instance_id, hashlib.sha384(model).digest()
            receipt, signed = enclave.receipt(lease.lease_id, 60)
            report = pb.UsageReport(
                lease_id=lease.lease_id,
                seq=receipt.seq,
                used=60,
                want_more=True,
                receipt=pb.Receipt(body=signed.body, signature=signed.signature),
            )
            topped = await gateway.ReportUsage(report)
            assert (topped.limit, topped.deployment_balance) == (150, 0)
            assert await gateway.ReportUsage(report) == topped
            usage = (await r.admin.Usage(pb.UsageRequest(deployment="d"))).deployments[0]
            assert (usage.used, usage.leased, usage.balance, usage.instances) == (60, 90, 0, 1)

    asyncio.run(scenario())


def test_the_report_stream_answers_each_report_in_order_and_refusals_in_band(tmp_path: Path) -> None:
    model = onnx_model(1000)

    async def scenario() -> None:
        async with running(tmp_path) as r:
            token = await r.lend("d", model=model, units=150, lease_size=100)
            enrolled, enclave, gateway = await r.enrol("d", token)
            enclave.instance_id, enclave.model_sha384 = enrolled.instance_id, hashlib.sha384(model).digest()
            lease = await gateway.AcquireLease(pb.LeaseRequest())

            def report(used: int, **changes: object) -> tuple[pb.UsageReport, Any]:
                receipt, signed = enclave.receipt(lease.lease_id, used, **changes)
                message = pb.UsageReport(
                    lease_id=lease.lease_id,
                    seq=receipt.seq,
                    used=used,
                    want_more=used == 60,
                    receipt=pb.Receipt(body=signed.body, signature=signed.signature),
                )
                return message, receipt

            stream = gateway.ReportStream(None)
            first, receipt = report(10)
            await stream.write(first)
            assert (await stream.read()).lease.limit == 100
            enclave.accepted(receipt)
            # A receipt signed by another key is refused in-band; the stream goes on.
            forged, _ = report(20, key=generate_identity_key())
            await stream.write(forged)
            refused = (await stream.read()).refusal
            assert refused.code == "PERMISSION_DENIED"
            assert "signature" in refused.message
            # The same report again is an idempotent retry; then the chain goes on.
            await stream.write(first)
            assert (await stream.read()).lease.limit == 100
            topping, receipt = report(60)
            await stream.write(topping)
            topped = (await stream.read()).lease
            assert (topped.limit, topped.deployment_balance) == (150, 0)
            await stream.done_writing()
            assert await stream.read() is grpc.aio.EOF
            usage = (await r.admin.Usage(pb.UsageRequest(deployment="d"))).deployments[0]
            assert (usage.used, usage.leased) == (60, 90)
            # Without the enrolment certificate the stream is refused as a whole.
            plain = r.enrolment().ReportStream(None)
            await plain.write(first)
            assert await _status(plain.read()) == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(scenario())


def test_the_control_stream_beats_and_pushes_the_kill_switch(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            token = await r.lend("d", units=100, offline_grace_seconds=60)
            enrolled, _, gateway = await r.enrol("d", token)
            lease = await gateway.AcquireLease(pb.LeaseRequest())
            stream = gateway.Watch(pb.WatchRequest())
            first = await stream.read()
            assert first.WhichOneof("event") == "heartbeat"
            assert (first.heartbeat.valid_for_seconds, first.heartbeat.suspended) == (60, False)
            listed = (await r.admin.Enclaves(pb.EnclavesRequest(deployment="d"))).enclaves
            assert [(e.instance_id, e.connected) for e in listed] == [(enrolled.instance_id, True)]

            await r.admin.Suspend(pb.DeploymentRequest(deployment="d"))
            event = await stream.read()
            assert event.WhichOneof("event") == "lease"
            assert (event.lease.lease_id, event.lease.suspended) == (lease.lease_id, True)
            assert (
                await _status(gateway.FetchModel(pb.FetchModelRequest()).read())
                == grpc.StatusCode.PERMISSION_DENIED
            )

            await r.admin.Resume(pb.DeploymentRequest(deployment="d"))
            assert not (await stream.read()).lease.suspended
            await r.admin.Revoke(pb.RevokeRequest(deployment="d", all=True))
            event = await stream.read()
            assert (event.lease.limit, event.lease.deployment_balance) == (0, 0)
            stream.cancel()

    asyncio.run(scenario())


def test_gateway_calls_need_the_enrolment_certificate(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            token = await r.lend("d", units=10)
            enrolled, enclave, _ = await r.enrol("d", token)
            plain = r.enrolment()
            # On the TLS-only port there is no client certificate to name the caller.
            assert await _status(plain.AcquireLease(pb.LeaseRequest())) == grpc.StatusCode.PERMISSION_DENIED
            assert await _status(plain.Watch(pb.WatchRequest()).read()) == grpc.StatusCode.PERMISSION_DENIED
            # A certificate for the right name from another CA fails the handshake itself.
            foreign = CertificateAuthority.load_or_create(tmp_path, "foreign", "Foreign", now=Clock().now)
            forged = foreign.issue_client(
                enclave.key.public_key(),
                enrolled.instance_id,
                now=datetime.datetime.now(datetime.UTC),
                validity=datetime.timedelta(hours=1),
            )
            stranger = r.gateway(enclave.key_pem, forged.public_bytes(serialization.Encoding.PEM))
            assert (
                await _status(stranger.AcquireLease(pb.LeaseRequest(), timeout=5))
                == grpc.StatusCode.UNAVAILABLE
            )

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda e, n, t: e.enrol_request(n, "wrong"), grpc.StatusCode.PERMISSION_DENIED),
        (lambda e, n, t: e.enrol_request(os.urandom(32), t), grpc.StatusCode.PERMISSION_DENIED),
        (lambda e, n, t: e.enrol_request(n, t, csr=b"junk"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda e, n, t: e.enrol_request(n, t, evidence=b"junk"), grpc.StatusCode.PERMISSION_DENIED),
        (lambda e, n, t: e.enrol_request(n, t, deployment="nope"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
    ids=["wrong-token", "unknown-nonce", "csr-garbage", "evidence-garbage", "unknown-deployment"],
)
def test_enrolment_refusals_become_status_codes(tmp_path: Path, build: Any, code: grpc.StatusCode) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            token = await r.lend("d")
            stub = r.enrolment()
            nonce = (await stub.GetChallenge(pb.ChallengeRequest(deployment="d"))).nonce
            assert await _status(stub.Enrol(build(FakeEnclave(r.ca_pem, "d"), nonce, token))) == code
            assert (
                await _status(stub.GetChallenge(pb.ChallengeRequest(deployment="nope")))
                == grpc.StatusCode.FAILED_PRECONDITION
            )

    asyncio.run(scenario())


def test_get_challenge_answers_an_unknown_and_a_suspended_deployment_alike(tmp_path: Path) -> None:
    """Issue 13 item 8: a suspended deployment answered FAILED_PRECONDITION, an unknown one NOT_FOUND."""

    async def scenario() -> None:
        async with running(tmp_path) as r:
            await r.lend("paused")
            await r.admin.Suspend(pb.DeploymentRequest(deployment="paused"))
            stub = r.enrolment()
            answers = []
            for name in ("paused", "nope", "x" * 100_000):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GetChallenge(pb.ChallengeRequest(deployment=name))
                answers.append((refused.value.code(), refused.value.details()))
            assert answers[0] == answers[1] == answers[2]
            assert answers[0][0] == grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(scenario())


def test_admin_errors_become_status_codes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            await r.lend("d")
            admin = r.admin
            cases = [
                (admin.Grant(pb.GrantRequest(deployment="nope", units=1)), grpc.StatusCode.NOT_FOUND),
                (admin.Grant(pb.GrantRequest(deployment="d", units=0)), grpc.StatusCode.INVALID_ARGUMENT),
                (admin.Revoke(pb.RevokeRequest(deployment="d")), grpc.StatusCode.INVALID_ARGUMENT),
                (
                    admin.CreateDeployment(
                        pb.CreateDeploymentRequest(name="d", model="d-model", manifest="x")
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                (
                    admin.AddModel(iter([pb.ModelUpload(data=b"no name first")])),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                (
                    admin.AddModel(iter([pb.ModelUpload(name="d-model"), pb.ModelUpload(data=b"x")])),
                    grpc.StatusCode.ALREADY_EXISTS,
                ),
            ]
            for call, code in cases:
                assert await _status(call) == code
            metrics = r.server.metrics.registry
            assert (
                metrics.get_sample_value(
                    "custos_custodian_requests_total", {"method": "Grant", "code": "NOT_FOUND"}
                )
                == 1
            )

    asyncio.run(scenario())


def test_the_data_dir_is_private_and_serves_one_custodian(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, metrics_listen=Address("127.0.0.1", 0)) as r:
            data = tmp_path / "data"
            assert stat.S_IMODE(data.stat().st_mode) == 0o700
            assert stat.S_IMODE((data / "admin.sock").stat().st_mode) == 0o600
            with pytest.raises(ConfigError, match="already serving"):
                await CustodianServer.start(CustodianConfig(data_dir=data, listen=Address("127.0.0.1", 0)))
            metrics = r.server.endpoints.metrics  # type: ignore[union-attr]
            assert metrics is not None
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
            )
            assert "custos_custodian_watch_streams 0.0" in text
            published = json.loads((data / "endpoints.json").read_text())
            assert published == r.server.endpoints.to_json()  # type: ignore[union-attr]
            assert published["metrics"] == str(metrics)
        assert not (tmp_path / "data" / "endpoints.json").exists()
        open_dir = tmp_path / "open"
        open_dir.mkdir(mode=0o755)
        open_dir.chmod(0o755)
        with pytest.raises(ConfigError, match="other users"):
            await CustodianServer.start(CustodianConfig(data_dir=open_dir, listen=Address("127.0.0.1", 0)))

    asyncio.run(scenario())


def test_a_busy_port_is_a_clear_error_and_releases_the_data_dir(tmp_path: Path) -> None:
    async def scenario() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            data = tmp_path / "data"
            busy = Address("127.0.0.1", port)
            for config in (
                CustodianConfig(data_dir=data, listen=busy),
                CustodianConfig(data_dir=data, listen=Address("127.0.0.1", 0), metrics_listen=busy),
            ):
                with pytest.raises(ConfigError, match=str(port)):
                    await CustodianServer.start(config)
        server = await CustodianServer.start(CustodianConfig(data_dir=data, listen=Address("127.0.0.1", 0)))
        await server.stop(grace=0)

    asyncio.run(scenario())


def test_a_damaged_store_answers_internal_and_keeps_serving(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            token = await r.lend("d", units=10)
            _, _, gateway = await r.enrol("d", token)
            for sealed in (tmp_path / "data" / "models").iterdir():
                sealed.unlink()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await gateway.FetchModel(pb.FetchModelRequest()).read()
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            assert "missing" in (failed.value.details() or "")
            assert (await gateway.AcquireLease(pb.LeaseRequest())).limit == 10

    asyncio.run(scenario())
