"""connect(): verification before anything is sent, against a fake enclave on real loopback TLS."""

from __future__ import annotations

import datetime
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from client import connect
from client.errors import (
    ClientError,
    EnclaveNotListeningError,
    EnclaveUnavailableError,
    VerificationRefusedError,
)
from enclave import identity
from enclave.attestation import ReferenceValues
from enclave.attestation.manifest import MAX_MANIFEST_BYTES
from protos import custos_pb2
from testkit.processes import DIGITS_SAMPLES
from tests.unit.client.fake_enclave import (
    Certificate,
    FakeEnclave,
    attested_certificate,
    honest,
    plain_certificate,
    serving,
)
from tests.unit.enclave._sim_evidence import MODEL_SHA384, pinned_registers, reference, sim_enclave

SAMPLE = DIGITS_SAMPLES / "digit-3.png"


def test_verified_query_sends_the_image_as_is(fake: FakeEnclave, address: str) -> None:
    image = SAMPLE.read_bytes()
    with connect(address, reference()) as conn:
        assert conn.simulated
        assert conn.model_sha384 == MODEL_SHA384.hex()
        assert conn.key_sha256 == identity.key_fingerprint(identity.public_key_der(fake.enclave.key))
        result = conn.infer_image(image, top_k=2)
    assert [(p.index, p.label) for p in result.top] == [(3, "three"), (8, "eight")]
    assert result.top[0].score == pytest.approx(0.9)
    assert result.remaining_quota == 7
    assert result.model_sha384 == MODEL_SHA384.hex()
    assert result.simulated
    assert len(fake.nonces) == 1
    assert len(fake.nonces[0]) == 32
    (request,) = fake.requests
    assert request.image == image
    assert request.top_k == 2


def test_each_connection_asks_with_a_new_nonce(fake: FakeEnclave, address: str) -> None:
    for _ in range(2):
        connect(address, reference()).close()
    assert len(set(fake.nonces)) == 2


def test_manifest_can_be_a_file(fake: FakeEnclave, address: str, tmp_path: Path) -> None:
    manifest = tmp_path / "end-user.toml"
    manifest.write_text(reference().to_toml())
    with connect(address, manifest) as conn:
        conn.infer_image(b"png")
    assert len(fake.requests) == 1


# ------------------------------------------------------- refused on the certificate

Setup = Callable[[FakeEnclave], tuple[ReferenceValues, Certificate | None]]


def _manifest(**changes: object) -> Setup:
    return lambda fake: (reference(**changes), None)


def _certificate(make: Callable[[FakeEnclave], Certificate]) -> Setup:
    return lambda fake: (reference(), make(fake))


def _no_model_loaded(fake: FakeEnclave) -> Certificate:
    fake.enclave = sim_enclave(with_model=False)
    return attested_certificate(fake)


def _tampered_claims(fake: FakeEnclave) -> Certificate:
    honest_tls = replace(fake.enclave.claims, purpose="tls", nonce=b"")
    return attested_certificate(fake, claims=replace(honest_tls, deployment="other"), evidence_for=honest_tls)


CERTIFICATE_REFUSALS = [
    ("code-measurement", _manifest(code_sha384="00" * 48), "code measurement"),
    ("boot-register", _manifest(registers={"sim.boot": "33" * 48}), "register sim.boot"),
    ("custodian-ca", _manifest(custodian_ca_sha256="11" * 32), "custodian CA"),
    (
        "simulated-for-a-tpm-manifest",
        _manifest(platform="tpm", allow_simulation=False, registers=pinned_registers("tpm")),
        "manifest expects 'tpm'",
    ),
    ("model-not-allowed", _manifest(allowed_model_sha384=("22" * 48,)), "not among the manifest's allowed"),
    ("no-model-allowed", _manifest(allowed_model_sha384=()), "allows no model"),
    (
        "other-platform",
        _manifest(platform="tdx", registers=pinned_registers("tdx")),
        "manifest expects 'tdx'",
    ),
    (
        "evidence-for-another-key",
        _certificate(lambda fake: attested_certificate(fake, key=identity.generate_identity_key())),
        "another public key",
    ),
    ("no-evidence", _certificate(plain_certificate), "no attestation extension"),
    ("no-model-loaded", _certificate(_no_model_loaded), "no model loaded"),
    (
        "enrolment-claims",
        _certificate(lambda fake: attested_certificate(fake, claims=fake.enclave.claims)),
        "expected 'tls'",
    ),
    ("tampered-claims", _certificate(_tampered_claims), "report data"),
]


@pytest.mark.parametrize(
    ("setup", "reason"),
    [pytest.param(setup, reason, id=name) for name, setup, reason in CERTIFICATE_REFUSALS],
)
def test_certificate_refused_before_anything_is_sent(fake: FakeEnclave, setup: Setup, reason: str) -> None:
    manifest, certificate = setup(fake)
    with serving(fake, certificate) as addr, pytest.raises(VerificationRefusedError, match=reason):
        connect(addr, manifest)
    assert fake.nonces == []
    assert fake.requests == []


@pytest.mark.parametrize(
    ("days", "reason"), [(8, "expired"), (-1, "not valid before")], ids=["expired", "not-yet-valid"]
)
def test_certificate_outside_its_validity_is_refused(
    fake: FakeEnclave, address: str, days: int, reason: str
) -> None:
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    with pytest.raises(VerificationRefusedError, match=reason):
        connect(address, reference(), now=when)
    assert fake.nonces == []


def test_refusal_keeps_every_mismatch(address: str) -> None:
    manifest = reference(code_sha384="00" * 48, custodian_ca_sha256="11" * 32)
    with pytest.raises(VerificationRefusedError) as info:
        connect(address, manifest)
    lines = info.value.diagnostics().splitlines()
    assert any("code measurement" in line for line in lines)
    assert any("custodian CA" in line for line in lines)


# ------------------------------------------------------ refused on the fresh evidence


def _stale(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    return honest(fake, bytes(32))  # an answer to some other challenge


def _replayed_certificate(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    return fake.attest(replace(fake.enclave.claims, purpose="tls", nonce=b""))


def _other_key(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    other = sim_enclave(with_model=True, purpose="attest", nonce=nonce)
    return custos_pb2.AttestResponse(evidence=other.evidence(), claims=other.claims.to_bytes())


def _model_gone(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    claims = replace(fake.enclave.claims, purpose="attest", nonce=nonce)
    unloaded = replace(claims, log=tuple(e for e in claims.log if e.kind != "model"))
    return fake.attest(unloaded)  # claims that no longer replay to the attester's register


def _garbage(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    return custos_pb2.AttestResponse(evidence=b"{}", claims=b"{}")


def _refuses(fake: FakeEnclave, nonce: bytes) -> custos_pb2.AttestResponse:
    raise RuntimeError("the fake will not attest")  # grpc answers UNKNOWN


ATTEST_REFUSALS = [
    ("stale-nonce", _stale, "expected nonce"),
    ("certificate-evidence-replayed", _replayed_certificate, "expected 'attest'"),
    ("evidence-for-another-key", _other_key, "another public key"),
    ("log-does-not-replay", _model_gone, "does not replay"),
    ("garbage", _garbage, "fresh evidence refused"),
    ("attest-fails", _refuses, "fresh attestation failed: enclave answered UNKNOWN"),
]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [pytest.param(answer, reason, id=name) for name, answer, reason in ATTEST_REFUSALS],
)
def test_fresh_evidence_refused_before_any_input(
    fake: FakeEnclave,
    address: str,
    answer: Callable[[FakeEnclave, bytes], custos_pb2.AttestResponse],
    reason: str,
) -> None:
    fake.answer = answer
    with pytest.raises(VerificationRefusedError, match=reason):
        connect(address, reference())
    assert len(fake.nonces) == 1
    assert fake.requests == []


# ----------------------------------------------------------- unreachable, bad arguments


def test_nobody_listening_says_what_likely_happened() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(EnclaveNotListeningError) as info:
            connect(f"127.0.0.1:{port}", reference(), timeout=5)
    assert isinstance(info.value, EnclaveUnavailableError)
    message = str(info.value)
    assert message.startswith(f"nothing is listening at 127.0.0.1:{port} (connection refused)")
    assert "stopped" in message
    assert "zeroized" in message
    assert "suspension" in message
    assert "try again once it has enrolled again" in message


def test_a_server_that_does_not_speak_tls_is_unavailable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer_in_plain_text() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(4096)
                peer.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer_in_plain_text)
        thread.start()
        try:
            with pytest.raises(EnclaveUnavailableError, match="TLS handshake"):
                connect(f"127.0.0.1:{listener.getsockname()[1]}", reference(), timeout=5)
        finally:
            thread.join()


@pytest.mark.parametrize(
    "address",
    ["localhost", "localhost:", ":8443", "localhost:https", "localhost:0", "localhost:65536", "::1:8443"],
    ids=["no-port", "empty-port", "no-host", "named-port", "port-zero", "port-too-big", "bare-ipv6"],
)
def test_malformed_address_is_refused_before_dialling(address: str) -> None:
    with pytest.raises(ClientError, match=r"HOST:PORT|valid port"):
        connect(address, reference())


def _write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "manifest.toml"
    path.write_bytes(content)
    return path


MANIFEST_FILES = [
    ("missing", lambda tmp: tmp / "absent.toml", "cannot read manifest"),
    ("directory", lambda tmp: tmp, "cannot read manifest"),
    ("not-toml", lambda tmp: _write(tmp, b"platform = "), "not valid TOML"),
    ("wrong-format", lambda tmp: _write(tmp, b'format = "x"\n'), "format must be"),
    ("too-large", lambda tmp: _write(tmp, b"#" * (MAX_MANIFEST_BYTES + 1)), "limit"),
    ("not-utf8", lambda tmp: _write(tmp, b"\xff\xfe"), "not valid TOML"),
]


@pytest.mark.parametrize(
    ("make", "reason"), [pytest.param(make, reason, id=name) for name, make, reason in MANIFEST_FILES]
)
def test_unusable_manifest_file(
    fake: FakeEnclave, address: str, tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    with pytest.raises(ClientError, match=reason):
        connect(address, make(tmp_path))
    assert fake.nonces == []


@pytest.mark.parametrize("timeout", [0, -1.0], ids=["zero", "negative"])
def test_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ClientError, match="timeout"):
        connect("127.0.0.1:1", reference(), timeout=timeout)


def test_a_closed_connection_sends_nothing(fake: FakeEnclave, address: str) -> None:
    with connect(address, reference()) as conn:
        pass
    with pytest.raises(ClientError, match="closed"):
        conn.infer_image(b"png")
    with pytest.raises(ClientError, match="closed"):
        conn.status()
    assert fake.requests == []
