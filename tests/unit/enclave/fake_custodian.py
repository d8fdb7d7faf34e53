"""A fake custodian gateway for the daemon tests: real TLS, real appraisal, real envelope.

It implements the ``EnclaveGateway`` servicer on two loopback listeners like the
real custodian (TLS for enrolment, mutual TLS for the rest), appraises the
enclave's evidence with ``enclave.attestation.appraise``, issues the client
certificate from a test enclave CA and streams a model sealed with
``ModelSealer``. Its quota follows docs/protocol.md closely enough for the
enclave's side to be tested; it is not the custodian.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave._daemon.measured import reference_values
from enclave.attestation import ReferenceValues, appraise
from enclave.envelope import ModelSealer, new_data_key, new_model_id, wrap_key
from enclave.errors import EnclaveError, ReceiptError
from enclave.identity import public_key_der
from enclave.receipts import GENESIS, Receipt, check_successor, verify_receipt
from protos import custos_pb2, custos_pb2_grpc

NOW = datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    san: str | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class CertAuthority:
    """A self-signed CA that can issue server and client certificates."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _issue(name, self.key.public_key(), None, self.key, ca=True)
        self.pem = _pem(self.cert)
        self.der = self.cert.public_bytes(serialization.Encoding.DER)

    def server_pair(self, san: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        return _key_pem(key), _pem(_issue(san, key.public_key(), self.cert, self.key, ca=False, san=san))

    def client_cert(self, cn: str, public_key: ec.EllipticCurvePublicKey) -> bytes:
        return _pem(_issue(cn, public_key, self.cert, self.key, ca=False))


@dataclass
class Instance:
    instance_id: str
    public_key: ec.EllipticCurvePublicKey
    # The receipt chain: last accepted sequence number and body.
    last_seq: int = 0
    last_body: bytes = b""


@dataclass
class FakeLease:
    lease_id: str
    limit: int
    used: int = 0
    closed: bool = False


class _Refused(Exception):  # noqa: N818 -- a control-flow signal, not an error
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details


class _InBand:
    """A servicer context whose ``abort`` raises ``_Refused`` instead of ending the call."""

    def __init__(self, context) -> None:
        self._context = context

    def auth_context(self):
        return self._context.auth_context()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Refused(code, details)


@dataclass
class FakeGateway(custos_pb2_grpc.EnclaveGatewayServicer):
    model: bytes
    deployment: str = "demo"
    token: str = "join-token"
    balance: int = 100
    lease_size: int = 10
    grace: int = 30
    # Sent at enrolment; 0 leaves the enclave's default (four graces).
    zeroize_after: int = 0
    # "flip" a ciphertext byte, "reorder" two chunks, "truncate" the final chunk, "wrong-key" context.
    tamper: str | None = None
    chunk_size: int = 64
    # GetChallenge and Enrol calls to answer RESOURCE_EXHAUSTED (a busy custodian) before answering.
    busy_answers: int = 0
    # Reports (ReportUsage calls, ReportStream messages) to fail with UNAVAILABLE before answering.
    fail_reports: int = 0
    custodian_ca: CertAuthority = field(default_factory=lambda: CertAuthority("custodian test CA"))
    enclave_ca: CertAuthority = field(default_factory=lambda: CertAuthority("enclave test CA"))

    def __post_init__(self) -> None:
        self.reference: ReferenceValues = reference_values("sim", self.custodian_ca.der)
        self.model_id = new_model_id()
        self.data_key = new_data_key()
        sealer = ModelSealer(self.data_key, self.model_id, chunk_size=self.chunk_size)
        self.chunks = [*sealer.update(self.model), sealer.finish()]
        self.sha384 = sealer.sha384
        self.challenges: set[bytes] = set()
        self.instances: dict[str, Instance] = {}
        self.lease: FakeLease | None = None
        # Leases replaced by a newer one; reports for them still count.
        self.old_leases: dict[str, FakeLease] = {}
        self.suspended = False
        self.reports: list[custos_pb2.UsageReport] = []
        self.receipts: list[Receipt] = []
        self.receipt_refusals: list[str] = []
        self.lease_requests: list[custos_pb2.LeaseRequest] = []
        self.watch_count = 0
        self.mtls_port = 0
        self.enrol_refusals: list[str] = []
        self.challenges_refused = 0
        self.bind_loop()

    def bind_loop(self) -> None:
        """A fresh event queue for the loop the gateway serves on."""
        self._events: asyncio.Queue[custos_pb2.ControlEvent | None] = asyncio.Queue()

    # --------------------------------------------------------------- control

    def lease_message(self) -> custos_pb2.Lease:
        assert self.lease is not None
        return custos_pb2.Lease(
            lease_id=self.lease.lease_id,
            limit=self.lease.limit,
            valid_for_seconds=self.grace,
            suspended=self.suspended,
            deployment_balance=self.balance,
        )

    def set_suspended(self, suspended: bool) -> None:
        self.suspended = suspended
        self._events.put_nowait(custos_pb2.ControlEvent(lease=self.lease_message()))

    def revoke_all(self) -> None:
        assert self.lease is not None
        self.balance = 0
        self.lease.limit = self.lease.used
        self._events.put_nowait(custos_pb2.ControlEvent(lease=self.lease_message()))

    def expire(self) -> None:
        """The lease ran out on the custodian's side: the next AcquireLease opens another."""
        assert self.lease is not None
        self.lease.closed = True

    def drop_watch(self) -> None:
        """End the open control stream with UNAVAILABLE, as a lost connection would."""
        self._events.put_nowait(None)

    # --------------------------------------------------------------- service

    async def _busy(self, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        if self.busy_answers > 0:
            self.busy_answers -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too busy; try again shortly")

    async def GetChallenge(self, request, context):  # noqa: N802
        await self._busy(context)
        if request.deployment != self.deployment:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown deployment {request.deployment!r}")
        if self.suspended:
            self.challenges_refused += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "deployment is suspended")
        nonce = os.urandom(32)
        self.challenges.add(nonce)
        return custos_pb2.Challenge(nonce=nonce, expires_in_seconds=60)

    async def Enrol(self, request, context):  # noqa: N802
        async def refuse(code: grpc.StatusCode, reason: str) -> None:
            self.enrol_refusals.append(reason)
            await context.abort(code, reason)

        await self._busy(context)

        if request.join_token != self.token:
            await refuse(grpc.StatusCode.PERMISSION_DENIED, "join token is not valid")
        try:
            csr = x509.load_der_x509_csr(request.csr)
        except ValueError:
            await refuse(grpc.StatusCode.INVALID_ARGUMENT, "CSR does not parse")
        if not csr.is_signature_valid:
            await refuse(grpc.StatusCode.PERMISSION_DENIED, "CSR signature does not verify")
        public_der = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        claims_nonce = bytes.fromhex(_claims_field(request.claims, "nonce"))
        if claims_nonce not in self.challenges:
            await refuse(grpc.StatusCode.PERMISSION_DENIED, "nonce is unknown or used")
        self.challenges.discard(claims_nonce)
        try:
            appraise(
                request.evidence,
                request.claims,
                self.reference,
                now=datetime.datetime.now(datetime.UTC),
                nonce=claims_nonce,
                public_key=public_der,
                purpose="enrol",
                deployment=self.deployment,
            )
        except EnclaveError as exc:
            await refuse(grpc.StatusCode.PERMISSION_DENIED, f"attestation refused: {exc}")
        instance_id = uuid.uuid4().hex
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        self.instances[instance_id] = Instance(instance_id, public_key)
        return custos_pb2.Enrolment(
            instance_id=instance_id,
            certificate=self.enclave_ca.client_cert(instance_id, public_key),
            enclave_ca=self.enclave_ca.pem,
            offline_grace_seconds=self.grace,
            lease_size=self.lease_size,
            mtls_port=self.mtls_port,
            zeroize_after_seconds=self.zeroize_after,
        )

    def _instance(self, context) -> Instance:
        cn = context.auth_context()["x509_common_name"][0].decode()
        return self.instances[cn]

    async def FetchModel(self, request, context) -> AsyncIterator[custos_pb2.ModelPart]:  # noqa: N802
        instance = self._instance(context)
        context_bytes = self.model_id + instance.instance_id.encode()
        if self.tamper == "wrong-key":
            context_bytes = self.model_id + b"another instance"
        yield custos_pb2.ModelPart(
            header=custos_pb2.ModelHeader(
                model_id=self.model_id,
                name="tiny",
                plaintext_sha384=self.sha384,
                plaintext_size=len(self.model),
                chunk_size=self.chunk_size,
                chunk_count=len(self.chunks),
                wrapped_key=wrap_key(self.data_key, instance.public_key, context_bytes),
            )
        )
        chunks = list(self.chunks)
        if self.tamper == "flip":
            c = chunks[1]
            flipped = bytes([c.ciphertext[0] ^ 1]) + c.ciphertext[1:]
            chunks[1] = type(c)(c.index, c.final, flipped)
        elif self.tamper == "reorder":
            chunks[0], chunks[1] = chunks[1], chunks[0]
        elif self.tamper == "truncate":
            chunks = chunks[:-1]
        for c in chunks:
            yield custos_pb2.ModelPart(
                chunk=custos_pb2.ModelChunk(index=c.index, final=c.final, ciphertext=c.ciphertext)
            )

    async def AcquireLease(self, request, context):  # noqa: N802
        self._instance(context)
        self.lease_requests.append(request)
        if self.lease is None or self.lease.closed:
            if self.lease is not None:
                self.old_leases[self.lease.lease_id] = self.lease
            limit = 0 if self.suspended else min(self.lease_size, self.balance)
            self.balance -= limit
            self.lease = FakeLease(lease_id=uuid.uuid4().hex, limit=limit)
        return self.lease_message()

    async def _check_receipt(self, request, context, instance: Instance) -> bool:
        """Verify the report's receipt like the custodian does; False for a retry of the last one."""
        body, signature = request.receipt.body, request.receipt.signature
        try:
            receipt = verify_receipt(body, signature, public_key_der(instance.public_key))
            if (receipt.lease, receipt.seq, receipt.used) != (request.lease_id, request.seq, request.used):
                raise ReceiptError("binding", "receipt disagrees with the report")
            if receipt.instance != instance.instance_id or receipt.model_sha384 != self.sha384:
                raise ReceiptError("binding", "receipt names another instance or model")
            if receipt.seq == instance.last_seq and body == instance.last_body:
                return False
            last_digest = hashlib.sha256(instance.last_body).digest() if instance.last_seq else GENESIS
            check_successor(receipt, last_seq=instance.last_seq, last_digest=last_digest)
        except ReceiptError as exc:
            self.receipt_refusals.append(exc.reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"receipt refused: {exc}")
        instance.last_seq, instance.last_body = receipt.seq, body
        self.receipts.append(receipt)
        return True

    async def ReportUsage(self, request, context):  # noqa: N802
        instance = self._instance(context)
        if self.fail_reports > 0:
            self.fail_reports -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "custodian is busy")
        self.reports.append(request)
        lease = self.lease
        if lease is not None and request.lease_id in self.old_leases:
            if await self._check_receipt(request, context, instance):
                self.old_leases[request.lease_id].used = request.used
            return self.lease_message()
        if lease is None or request.lease_id != lease.lease_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such lease")
        if not await self._check_receipt(request, context, instance):
            return self.lease_message()
        if request.used < lease.used or request.used > lease.limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "used goes backwards or over the limit")
        lease.used = request.used
        if request.want_more and not self.suspended:
            add = min(self.balance, max(0, self.lease_size - (lease.limit - lease.used)))
            lease.limit += add
            self.balance -= add
        if request.final:
            self.balance += lease.limit - lease.used
            lease.closed = True
        return self.lease_message()

    async def ReportStream(self, requests, context):  # noqa: N802
        """ReportUsage for each report on the stream; its refusals answered in-band, as the custodian does."""
        in_band = _InBand(context)
        async for request in requests:
            try:
                lease = await self.ReportUsage(request, in_band)
            except _Refused as refused:
                if refused.code is grpc.StatusCode.UNAVAILABLE:
                    await context.abort(refused.code, refused.details)
                yield custos_pb2.ReportReply(
                    refusal=custos_pb2.Refusal(code=refused.code.name, message=refused.details)
                )
            else:
                yield custos_pb2.ReportReply(lease=lease)

    async def Watch(self, request, context) -> AsyncIterator[custos_pb2.ControlEvent]:  # noqa: N802
        self._instance(context)
        self.watch_count += 1
        period = max(1, min(5, self.grace / 3))
        while True:
            yield custos_pb2.ControlEvent(
                heartbeat=custos_pb2.Heartbeat(valid_for_seconds=self.grace, suspended=self.suspended)
            )
            try:
                event = await asyncio.wait_for(self._events.get(), period)
            except TimeoutError:
                continue
            if event is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            yield event


def _claims_field(claims: bytes, name: str) -> str:
    value = json.loads(claims)[name]
    assert isinstance(value, str)
    return value


class FakeCustodian:
    """The fake gateway on two loopback listeners: TLS for enrolment, mutual TLS for the rest."""

    def __init__(self, gateway: FakeGateway, *, port: int = 0) -> None:
        self.gateway = gateway
        self._servers: list[grpc.aio.Server] = []
        self.port = port

    async def __aenter__(self) -> FakeCustodian:
        gateway = self.gateway
        key, cert = gateway.custodian_ca.server_pair("custodian.custos")
        enrol_server = grpc.aio.server()
        custos_pb2_grpc.add_EnclaveGatewayServicer_to_server(gateway, enrol_server)
        self.port = enrol_server.add_secure_port(
            f"127.0.0.1:{self.port}", grpc.ssl_server_credentials([(key, cert)])
        )
        mtls_server = grpc.aio.server()
        custos_pb2_grpc.add_EnclaveGatewayServicer_to_server(gateway, mtls_server)
        gateway.mtls_port = mtls_server.add_secure_port(
            "127.0.0.1:0",
            grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=gateway.enclave_ca.pem, require_client_auth=True
            ),
        )
        self._servers = [enrol_server, mtls_server]
        for server in self._servers:
            await server.start()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for server in self._servers:
            await server.stop(None)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ThreadedCustodian:
    """The fake custodian on its own event loop in a thread, for code that must own the main thread."""

    def __init__(self, gateway: FakeGateway) -> None:
        self.gateway = gateway
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._custodian = FakeCustodian(gateway)

    def __enter__(self) -> FakeCustodian:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    async def _start(self) -> FakeCustodian:
        self.gateway.bind_loop()
        return await self._custodian.__aenter__()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._custodian.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
