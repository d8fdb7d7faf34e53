"""The daemon end to end in process: fake custodian, attested TLS, metered inference."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import io
import os
import ssl
import threading
import types
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from enclave._daemon.admission import BoundedPool, StreamSlots
from enclave._daemon.daemon import Daemon, Ready
from enclave._daemon.errors import ModelRefusedError
from enclave._daemon.inference import InferenceService
from enclave._daemon.lease import Lease
from enclave._daemon.measured import MeasuredIdentity
from enclave._daemon.metrics import DaemonMetrics
from enclave.attestation import appraise
from enclave.attestation.sim import SimAttester
from enclave.identity import ENCLAVE_TLS_NAME, read_attested_certificate
from protos import custos_pb2, custos_pb2_grpc
from tests.unit.enclave.fake_custodian import FakeCustodian, FakeGateway
from tests.unit.enclave.test_daemon_link import eventually, make_config
from tests.unit.enclave.tiny_model import tiny_classifier

TINY = tiny_classifier()
PIXELS = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16


def png(pixels: np.ndarray = PIXELS) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


class Running:
    """A daemon serving for a fake custodian, with a client channel pinned to its certificate."""

    def __init__(self, gateway: FakeGateway, custodian: FakeCustodian, daemon: Daemon, ready: Ready) -> None:
        self.gateway, self.custodian, self.daemon, self.ready = gateway, custodian, daemon, ready
        self.certificate_pem = b""
        self.stub: custos_pb2_grpc.InferenceAsyncStub

    async def infer(self, **fields: object) -> custos_pb2.InferResponse:
        return await self.stub.Infer(custos_pb2.InferRequest(**fields))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(gateway: FakeGateway, **overrides: object) -> AsyncIterator[Running]:
    async with FakeCustodian(gateway) as custodian:
        ready: asyncio.Future[Ready] = asyncio.get_running_loop().create_future()
        daemon = Daemon(
            make_config(gateway, custodian.address, **overrides),
            SimAttester(),
            on_ready=ready.set_result,
        )
        task = asyncio.ensure_future(daemon.run())
        done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        run = Running(gateway, custodian, daemon, ready.result())
        host, port = run.ready.inference.rsplit(":", 1)
        run.certificate_pem = (
            await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)))
        ).encode()
        channel = grpc.aio.secure_channel(
            run.ready.inference,
            grpc.ssl_channel_credentials(root_certificates=run.certificate_pem),
            options=[("grpc.ssl_target_name_override", ENCLAVE_TLS_NAME)],
        )
        run.stub = custos_pb2_grpc.InferenceStub(channel)
        try:
            yield run
        finally:
            await channel.close(None)
            daemon.request_stop()
            await task


def expect_code(code: grpc.StatusCode, match: str | None = None) -> contextlib.AbstractContextManager[object]:
    class Check(contextlib.AbstractContextManager[object]):
        def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
            assert isinstance(exc, grpc.aio.AioRpcError), f"expected {code.name}, got {exc!r}"
            assert exc.code() == code, f"{exc.code().name}: {exc.details()}"
            if match is not None:
                assert match in (exc.details() or ""), exc.details()
            return True

    return Check()


def test_serves_over_attested_tls_and_counts_each_inference() -> None:
    gateway = FakeGateway(model=TINY.data, balance=100, lease_size=10)

    async def run() -> None:
        async with running(gateway, metrics_listen="127.0.0.1:0") as r:
            # The certificate carries evidence for its own key, with the model in the log.
            _, public_key, evidence, claims = read_attested_certificate(r.certificate_pem)
            appraisal = appraise(
                evidence,
                claims,
                gateway.reference.with_models(gateway.sha384.hex()),
                now=datetime.datetime.now(datetime.UTC),
                nonce=None,
                public_key=public_key,
                purpose="tls",
                deployment=gateway.deployment,
                require_model=True,
            )
            assert appraisal.model_sha384 == gateway.sha384
            assert r.ready.model_sha384 == gateway.sha384.hex()

            reply = await r.infer(image=png(), top_k=2)
            expected = TINY.scores(PIXELS.astype(np.float32) / 255)
            order = np.argsort(-expected)[:2]
            assert [s.index for s in reply.top] == list(order)
            assert [s.label for s in reply.top] == [TINY.labels[i] for i in order]
            assert [s.score for s in reply.top] == pytest.approx(list(expected[order]), rel=1e-5)
            assert reply.model_sha384 == gateway.sha384.hex()
            assert reply.remaining_quota == 9 + 90

            tensor = (PIXELS.astype(np.float32) / 255).reshape(1, 1, 4, 4)
            reply = await r.infer(tensor=custos_pb2.Tensor(shape=[1, 1, 4, 4], float32_data=tensor.tobytes()))
            assert len(reply.top) == 3  # default top-k 5, clamped to the classes there are

            status = await r.stub.Status(custos_pb2.StatusRequest())
            assert (status.deployment, status.platform, status.model_loaded) == ("demo", "sim", True)
            # Issue 13 item 8: an anonymous caller learns nothing of the lease or the traffic.
            assert (status.lease_limit, status.lease_used, status.served, status.refused) == (0, 0, 0, 0)
            assert status.custodian_reachable

            scraped = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://{r.ready.metrics}/metrics", timeout=5).read().decode()
            )
            assert 'custos_enclave_inferences_total{outcome="served"} 2.0' in scraped
            assert "custos_enclave_lease_used 2.0" in scraped
            assert "custos_enclave_model_loaded 1.0" in scraped

        final = gateway.reports[-1]
        assert (final.final, final.used) == (True, 2)

    asyncio.run(run())


def test_invalid_input_is_refused_before_it_costs_quota() -> None:
    gateway = FakeGateway(model=TINY.data)
    cases = {
        "no input": {},
        "not an image": {"image": b"hello, not an image"},
        "truncated PNG": {"image": png()[:40]},
        "wrong tensor shape": {"tensor": custos_pb2.Tensor(shape=[1, 1, 4, 5], float32_data=bytes(80))},
        "wrong tensor length": {"tensor": custos_pb2.Tensor(shape=[1, 1, 4, 4], float32_data=bytes(128))},
    }

    async def run() -> None:
        async with running(gateway) as r:
            for case, fields in cases.items():
                with expect_code(grpc.StatusCode.INVALID_ARGUMENT):
                    await r.infer(**fields)
                assert (r.daemon.lease.committed, r.daemon.lease.reserved) == (0, 0), case
            assert (r.daemon.service.served, r.daemon.service.refused) == (0, len(cases))

    asyncio.run(run())


@pytest.mark.parametrize(
    ("size", "accepted"),
    [
        pytest.param(0, False, id="empty"),
        pytest.param(15, False, id="15-bytes"),
        pytest.param(16, True, id="16-bytes"),
        pytest.param(64, True, id="64-bytes"),
        pytest.param(65, False, id="65-bytes"),
    ],
)
def test_attest_binds_a_fresh_nonce(size: int, accepted: bool) -> None:
    gateway = FakeGateway(model=TINY.data)

    async def run() -> None:
        async with running(gateway) as r:
            nonce = os.urandom(size)
            if not accepted:
                with expect_code(grpc.StatusCode.INVALID_ARGUMENT, "nonce must be 16 to 64 bytes"):
                    await r.stub.Attest(custos_pb2.AttestRequest(nonce=nonce))
                return
            reply = await r.stub.Attest(custos_pb2.AttestRequest(nonce=nonce))
            _, public_key, _, _ = read_attested_certificate(r.certificate_pem)
            appraise(
                reply.evidence,
                reply.claims,
                gateway.reference.with_models(gateway.sha384.hex()),
                now=datetime.datetime.now(datetime.UTC),
                nonce=nonce,
                public_key=public_key,
                purpose="attest",
                require_model=True,
            )

    asyncio.run(run())


def test_quota_runs_out_after_the_top_up() -> None:
    gateway = FakeGateway(model=TINY.data, balance=3, lease_size=2)

    async def run() -> None:
        async with running(gateway, topup_wait=0.3) as r:
            for _ in range(3):
                await r.infer(image=png())
            with expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "no inference left in the lease"):
                await r.infer(image=png())
            assert r.daemon.lease.committed == 3

    asyncio.run(run())


def test_concurrent_calls_never_serve_more_than_the_lease() -> None:
    gateway = FakeGateway(model=TINY.data, balance=5, lease_size=5)

    async def run() -> None:
        async with running(gateway, topup_wait=0.1) as r:
            results = await asyncio.gather(*(r.infer(image=png()) for _ in range(12)), return_exceptions=True)
            served = [x for x in results if isinstance(x, custos_pb2.InferResponse)]
            refused = [x for x in results if isinstance(x, grpc.aio.AioRpcError)]
            assert len(served) == 5
            assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}

    asyncio.run(run())


def test_suspension_takes_effect_at_once_and_resume_lifts_it() -> None:
    gateway = FakeGateway(model=TINY.data)

    async def run() -> None:
        async with running(gateway) as r:
            await r.infer(image=png())
            gateway.set_suspended(True)
            await eventually(lambda: r.daemon.lease.suspended, "suspension")
            with expect_code(grpc.StatusCode.PERMISSION_DENIED, "suspended"):
                await r.infer(image=png())
            gateway.set_suspended(False)
            await eventually(lambda: not r.daemon.lease.suspended, "resume")
            await r.infer(image=png())

    asyncio.run(run())


def test_lost_custodian_stops_service_after_the_offline_grace_without_crashing() -> None:
    gateway = FakeGateway(model=TINY.data, grace=1)

    async def run() -> None:
        async with running(gateway, shutdown_grace=0.5) as r:
            await r.infer(image=png())
            await r.custodian.stop()
            await eventually(lambda: r.daemon.lease.offline, "offline deadline")
            with expect_code(grpc.StatusCode.UNAVAILABLE, "custodian unreachable past the offline grace"):
                await r.infer(image=png())
            status = await r.stub.Status(custos_pb2.StatusRequest())
            assert not status.custodian_reachable

    asyncio.run(run())


@pytest.mark.parametrize("tamper", ["flip", "reorder", "truncate"])
def test_daemon_refuses_a_tampered_model_and_loads_nothing(tamper: str) -> None:
    gateway = FakeGateway(model=TINY.data, tamper=tamper)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            ready: list[Ready] = []
            daemon = Daemon(make_config(gateway, custodian.address), SimAttester(), on_ready=ready.append)
            with pytest.raises(ModelRefusedError, match="model envelope failed authentication"):
                await daemon.run()
            assert ready == []
            assert daemon.service.model is None
            assert [e.kind for e in daemon.identity.log] == ["instance", "code", "config"]
            assert daemon.metrics.registry.get_sample_value("custos_enclave_model_loaded") == 0

    asyncio.run(run())


def test_inference_without_a_model_is_a_failed_precondition() -> None:
    gateway = FakeGateway(model=TINY.data)
    config = make_config(gateway, "127.0.0.1:1")

    async def run() -> None:
        with ThreadPoolExecutor(1) as executor:
            service = InferenceService(
                config,
                MeasuredIdentity(SimAttester(), "demo"),
                Lease(topup_wait=0),
                DaemonMetrics(),
                executor,
                decoding=BoundedPool("decode", workers=1, waiting=0),
                attesting=BoundedPool("attest", workers=1, waiting=0),
                custodian_reachable=lambda: False,
                generating=executor,
                slots=StreamSlots(running=1, waiting=0),
            )
            server = grpc.aio.server()
            custos_pb2_grpc.add_InferenceServicer_to_server(service, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = custos_pb2_grpc.InferenceStub(channel)
                    with expect_code(grpc.StatusCode.FAILED_PRECONDITION, "no model is loaded"):
                        await stub.Infer(custos_pb2.InferRequest(image=png()))
                    with expect_code(grpc.StatusCode.FAILED_PRECONDITION, "no model is loaded"):
                        async for _ in stub.Generate(custos_pb2.GenerateRequest(prompt=b"hi")):
                            pass
                    status = await stub.Status(custos_pb2.StatusRequest())
                    assert not status.model_loaded
            finally:
                await server.stop(None)

    asyncio.run(run())


def test_top_k_is_bounded_on_the_server_before_it_costs_quota() -> None:
    """Issue 13 item 8: the client's 1..1000 bound is not enough; the enclave enforces it too."""
    gateway = FakeGateway(model=TINY.data)

    async def run() -> None:
        async with running(gateway) as r:
            with expect_code(grpc.StatusCode.INVALID_ARGUMENT, "top_k must be 1 to 1000, got 1001"):
                await r.infer(image=png(), top_k=1001)
            with expect_code(grpc.StatusCode.INVALID_ARGUMENT, "top_k"):
                await r.infer(image=png(), top_k=2**32 - 1)
            assert (r.daemon.lease.committed, r.daemon.lease.reserved) == (0, 0)
            reply = await r.infer(image=png(), top_k=1000)
            assert len(reply.top) == len(TINY.labels)

    asyncio.run(run())


def test_attest_and_decoding_do_not_wait_for_a_busy_inference_pool() -> None:
    """Issue 13 item 4: evidence and decoding have pools of their own, each with a bound."""
    gateway = FakeGateway(model=TINY.data)
    release = threading.Event()

    async def run() -> None:
        async with running(gateway, inference_workers=1, decode_workers=1, waiting_per_pool=0) as r:
            blocked = asyncio.get_running_loop().run_in_executor(r.daemon._executor, release.wait, 60)
            try:
                reply = await r.stub.Attest(custos_pb2.AttestRequest(nonce=os.urandom(32)), timeout=30)
                assert reply.evidence
                decoding = r.daemon._decoding
                decoding.admitted = 1  # its only worker taken, none may wait
                with expect_code(grpc.StatusCode.UNAVAILABLE, "enclave is busy (decode)"):
                    await r.stub.Infer(custos_pb2.InferRequest(image=png()), timeout=30)
                decoding.admitted = 0
                assert (r.daemon.lease.committed, r.daemon.lease.reserved) == (0, 0)
            finally:
                release.set()
                await blocked
            await r.infer(image=png())

    asyncio.run(run())


# Not walked into: the test's own copies live behind these (the fake custodian, module globals).
_OUTSIDE = (type, types.ModuleType, types.FunctionType, types.FrameType, FakeGateway)


def reachable_copies(root: object, needle: bytes, limit: int = 200_000) -> list[object]:
    """Byte buffers reachable from ``root`` (through gc referents) that contain ``needle``."""
    found: list[object] = []
    seen: set[int] = set()
    queue: list[object] = [root]
    while queue and len(seen) < limit:
        obj = queue.pop()
        if id(obj) in seen or isinstance(obj, _OUTSIDE):
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray) and needle in obj:
            found.append(obj)
        queue.extend(gc.get_referents(obj))
    return found


def test_no_plaintext_copy_of_the_model_outlives_the_load_or_the_zeroize() -> None:
    """Issue 13 item 7: the runtime's copy for onnxruntime was ``bytes`` and never wiped."""
    gateway = FakeGateway(model=TINY.data)
    needle = TINY.data[len(TINY.data) // 2 : len(TINY.data) // 2 + 48]

    async def run() -> None:
        async with running(gateway) as r:
            runtime = r.daemon.service.model
            assert runtime is not None
            await r.infer(image=png())
            assert reachable_copies(r.daemon, needle) == []
            assert reachable_copies(runtime, needle) == []

    asyncio.run(run())
