"""The client against a fake enclave on a real loopback TLS server with genuine sim evidence."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from client import connect
from client.cli import main as query_main
from client.errors import (
    ClientError,
    EnclaveUnavailableError,
    InvalidInputError,
    NotReadyError,
    QuotaExhaustedError,
    SuspendedError,
    VerificationRefusedError,
)
from enclave import identity
from protos import custos_pb2, custos_pb2_grpc
from tests.unit.enclave._sim_evidence import SimEnclave, reference, sim_enclave

Answer = Callable[["FakeEnclave", bytes], custos_pb2.AttestResponse]


def _honest(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    claims = replace(fake.enc.claims, purpose="attest", nonce=nonce)
    return custos_pb2.AttestResponse(
        evidence=fake.enc.attester.collect(claims.report_data()).to_bytes(), claims=claims.to_bytes()
    )


@dataclass
class FakeEnclave(custos_pb2_grpc.InferenceServicer):
    enc: SimEnclave
    answer: Answer = _honest
    infer_status: grpc.StatusCode | None = None
    infer_calls: int = 0
    seen_nonces: list[bytes] = field(default_factory=list)

    def Attest(self, request: custos_pb2.AttestRequest, context: Any) -> custos_pb2.AttestResponse:  # noqa: N802
        self.seen_nonces.append(request.nonce)
        return self.answer(self, request.nonce)

    def Infer(self, request: custos_pb2.InferRequest, context: Any) -> custos_pb2.InferResponse:  # noqa: N802
        self.infer_calls += 1
        if self.infer_status is not None:
            context.abort(self.infer_status, "refused by the fake")
        return custos_pb2.InferResponse(
            top=[custos_pb2.ClassScore(index=3, label="three", score=0.9)], remaining_quota=7
        )


def _serve(fake: FakeEnclave, cert_key: Any = None) -> Iterator[str]:
    tls = replace(fake.enc.claims, purpose="tls")
    evidence = fake.enc.attester.collect(tls.report_data()).to_bytes()
    key = cert_key or fake.enc.key
    cert = identity.attested_certificate(
        key, evidence, tls.to_bytes(), now=datetime.datetime.now(datetime.UTC)
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    custos_pb2_grpc.add_InferenceServicer_to_server(fake, server)
    creds = grpc.ssl_server_credentials(
        [(identity.private_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))]
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture
def fake() -> FakeEnclave:
    return FakeEnclave(sim_enclave(with_model=True))


@pytest.fixture
def address(fake: FakeEnclave) -> Iterator[str]:
    yield from _serve(fake)


def test_verified_query(fake: FakeEnclave, address: str) -> None:
    with connect(address, reference()) as conn:
        assert conn.simulated
        result = conn.infer_image(b"png bytes")
    assert result.top[0].label == "three"
    assert result.remaining_quota == 7
    assert fake.infer_calls == 1
    assert len(fake.seen_nonces[0]) == 32


def _stale(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    return _honest(fake, os.urandom(32))  # a replayed answer to some earlier challenge


def _other_key(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    other = sim_enclave(with_model=True, purpose="attest", nonce=nonce)
    return custos_pb2.AttestResponse(evidence=other.evidence(), claims=other.claims.to_bytes())


def _garbage(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    return custos_pb2.AttestResponse(evidence=b"{}", claims=b"{}")


@pytest.mark.parametrize(
    ("answer", "reason"),
    [(_stale, "nonce"), (_other_key, "another public key"), (_garbage, "refused")],
    ids=["replayed-nonce", "evidence-for-another-key", "garbage"],
)
def test_bad_fresh_evidence_is_refused_before_any_input(
    fake: FakeEnclave, answer: Answer, reason: str
) -> None:
    fake.answer = answer
    for addr in _serve(fake):
        with pytest.raises(VerificationRefusedError, match=reason):
            connect(addr, reference())
    assert fake.infer_calls == 0


def test_certificate_key_must_be_the_attested_key(fake: FakeEnclave) -> None:
    for addr in _serve(fake, cert_key=identity.generate_identity_key()):
        with pytest.raises(VerificationRefusedError, match="another public key"):
            connect(addr, reference())
    assert fake.infer_calls == 0


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        (reference(allow_simulation=False), "simulat"),
        (reference(code_sha384="00" * 48), "code measurement"),
        (reference(custodian_ca_sha256="11" * 32), "custodian CA"),
        (reference(allowed_model_sha384=()), "allows no model"),
    ],
    ids=["no-simulation", "code", "custodian-ca", "no-model-allowed"],
)
def test_manifest_mismatch_is_refused(fake: FakeEnclave, address: str, manifest: Any, reason: str) -> None:
    with pytest.raises(VerificationRefusedError, match=reason):
        connect(address, manifest)
    assert fake.seen_nonces == []  # refused on the certificate, before even the challenge


STATUS_ERRORS = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidInputError, 1),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, QuotaExhaustedError, 4),
    (grpc.StatusCode.PERMISSION_DENIED, SuspendedError, 5),
    (grpc.StatusCode.UNAVAILABLE, EnclaveUnavailableError, 1),
    (grpc.StatusCode.FAILED_PRECONDITION, NotReadyError, 1),
    (grpc.StatusCode.INTERNAL, ClientError, 1),
]


@pytest.mark.parametrize(
    ("code", "error", "exit_code"), STATUS_ERRORS, ids=[c[0].name for c in STATUS_ERRORS]
)
def test_enclave_status_codes_map_to_errors_and_exit_codes(
    fake: FakeEnclave,
    address: str,
    tmp_path: Path,
    code: grpc.StatusCode,
    error: type[ClientError],
    exit_code: int,
) -> None:
    fake.infer_status = code
    with connect(address, reference()) as conn, pytest.raises(error, match="refused by the fake") as info:
        conn.infer_image(b"x")
    assert type(info.value) is error
    manifest = tmp_path / "m.toml"
    manifest.write_text(reference().to_toml())
    image = tmp_path / "in.png"
    image.write_bytes(b"x")
    assert query_main(["--enclave", address, "--manifest", str(manifest), "--json", str(image)]) == exit_code


def test_cli_refusal_exits_3(fake: FakeEnclave, address: str, tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(reference(allow_simulation=False).to_toml())
    image = tmp_path / "in.png"
    image.write_bytes(b"x")
    assert query_main(["--enclave", address, "--manifest", str(manifest), str(image)]) == 3
    assert fake.infer_calls == 0


def test_cli_misuse_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        query_main(["--manifest", "m.toml", "x.png"])
    assert info.value.code == 2
    assert "--enclave" in capsys.readouterr().err


def test_unreachable_enclave_is_a_clear_error() -> None:
    with pytest.raises(EnclaveUnavailableError, match="cannot reach"):
        connect("127.0.0.1:1", reference(), timeout=2)
