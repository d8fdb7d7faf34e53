"""A fake enclave for the client's tests: the real Inference servicer interface on a real
loopback TLS server, with a certificate made by ``enclave.identity.attested_certificate``
over genuine sim evidence (``SimAttester`` over a real measurement log).

Each way a dishonest or broken enclave can answer is a field to set; the fake
records every Attest and Infer it receives, so a test can show nothing was sent.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave import identity
from enclave.attestation import AttestedClaims
from protos import custos_pb2, custos_pb2_grpc
from tests.unit.enclave._sim_evidence import MODEL_SHA384, SimEnclave, sim_enclave

Answer = Callable[["FakeEnclave", bytes], custos_pb2.AttestResponse]


def honest(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    """Fresh evidence over the caller's nonce, for the enclave's own key and log."""
    return fake.attest(replace(fake.enclave.claims, purpose="attest", nonce=nonce))


@dataclass
class FakeEnclave(custos_pb2_grpc.InferenceServicer):
    enclave: SimEnclave = field(default_factory=lambda: sim_enclave(with_model=True))
    answer: Answer = honest
    # Infer: abort with this status, or answer with this model hash.
    infer_status: grpc.StatusCode | None = None
    infer_details: str = "refused by the fake"
    model_sha384: str = MODEL_SHA384.hex()
    remaining_quota: int = 7
    nonces: list[bytes] = field(default_factory=list)
    requests: list[custos_pb2.InferRequest] = field(default_factory=list)

    def attest(self, claims: AttestedClaims) -> custos_pb2.AttestResponse:
        evidence = self.enclave.attester.collect(claims.report_data()).to_bytes()
        return custos_pb2.AttestResponse(evidence=evidence, claims=claims.to_bytes())

    def Attest(self, request: custos_pb2.AttestRequest, context: Any) -> custos_pb2.AttestResponse:  # noqa: N802
        self.nonces.append(request.nonce)
        return self.answer(self, request.nonce)

    def Infer(self, request: custos_pb2.InferRequest, context: Any) -> custos_pb2.InferResponse:  # noqa: N802
        self.requests.append(request)
        if self.infer_status is not None:
            context.abort(self.infer_status, self.infer_details)
        scores = [(3, "three", 0.9), (8, "eight", 0.06), (5, "five", 0.04)]
        return custos_pb2.InferResponse(
            top=[
                custos_pb2.ClassScore(index=i, label=label, score=s)
                for i, label, s in scores[: request.top_k]
            ],
            remaining_quota=self.remaining_quota,
            model_sha384=self.model_sha384,
        )

    def Status(self, request: custos_pb2.StatusRequest, context: Any) -> custos_pb2.StatusResponse:  # noqa: N802
        return custos_pb2.StatusResponse(
            deployment=self.enclave.claims.deployment,
            platform="sim",
            model_loaded=True,
            model_sha384=self.model_sha384,
            served=len(self.requests),
        )


@dataclass(frozen=True)
class Certificate:
    """What the fake presents in its TLS handshake, and the key it proves it holds."""

    key: ec.EllipticCurvePrivateKey
    pem: bytes


def attested_certificate(
    fake: FakeEnclave,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    claims: AttestedClaims | None = None,
    evidence_for: AttestedClaims | None = None,
    now: datetime.datetime | None = None,
) -> Certificate:
    """The enclave's certificate: purpose-"tls" evidence and claims in the attestation extension.

    ``claims`` replaces the claims the certificate carries; ``evidence_for`` makes the
    evidence's report data cover other claims than those (a tampered certificate).
    """
    tls = claims or replace(fake.enclave.claims, purpose="tls", nonce=b"")
    evidence = fake.enclave.attester.collect((evidence_for or tls).report_data()).to_bytes()
    key = key or fake.enclave.key
    cert = identity.attested_certificate(
        key, evidence, tls.to_bytes(), now=now or datetime.datetime.now(datetime.UTC)
    )
    return Certificate(key, cert.public_bytes(serialization.Encoding.PEM))


def plain_certificate(fake: FakeEnclave) -> Certificate:
    """A self-signed certificate for the enclave's key that carries no evidence."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.ENCLAVE_TLS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(fake.enclave.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity.ENCLAVE_TLS_NAME)]), critical=False)
        .sign(fake.enclave.key, hashes.SHA256())
    )
    return Certificate(fake.enclave.key, cert.public_bytes(serialization.Encoding.PEM))


@contextmanager
def serving(fake: FakeEnclave, certificate: Certificate | None = None) -> Iterator[str]:
    """Serve ``fake`` over TLS on a loopback port; yields its HOST:PORT."""
    certificate = certificate or attested_certificate(fake)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    custos_pb2_grpc.add_InferenceServicer_to_server(fake, server)
    credentials = grpc.ssl_server_credentials([(identity.private_key_pem(certificate.key), certificate.pem)])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
