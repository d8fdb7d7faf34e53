"""The certificate authorities: created once, reloaded, issuing what the protocol says; CSR checks."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from custodian.authority import CUSTODIAN_TLS_NAME, MAX_CSR_BYTES, CertificateAuthority, csr_public_key
from custodian.errors import ConfigError, CustodianError, InvalidRequestError, RefusedError
from enclave.identity import generate_identity_key, public_key_der
from tests.unit.custodian.fake_enclave import csr_der

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def test_ca_is_created_once_with_a_private_key_file(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "t-ca", "Test CA", now=NOW)
    assert stat.S_IMODE((tmp_path / "t-ca.key").stat().st_mode) == 0o600
    again = CertificateAuthority.load_or_create(tmp_path, "t-ca", "Test CA", now=NOW)
    assert again.sha256 == ca.sha256
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_key_that_does_not_match_its_certificate_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, "a", "A", now=NOW)
    CertificateAuthority.load_or_create(tmp_path, "b", "B", now=NOW)
    (tmp_path / "a.pem").write_bytes((tmp_path / "b.pem").read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path, "a", "A", now=NOW)


def test_client_certificate_names_the_instance_and_chains_to_the_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "e", "Enclave CA", now=NOW)
    key = generate_identity_key()
    cert = ca.issue_client(key.public_key(), "abc123", now=NOW, validity=datetime.timedelta(hours=24))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "abc123"
    assert cert.not_valid_after_utc - NOW == datetime.timedelta(hours=24)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert public_key_der(cert.public_key()) == public_key_der(key)  # type: ignore[arg-type]
    cert.verify_directly_issued_by(ca.certificate)


def test_server_identity_carries_the_fixed_name_and_the_chain(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "c", "Custodian CA", now=NOW)
    identity = ca.server_identity(CUSTODIAN_TLS_NAME, now=NOW)
    leaf, root = x509.load_pem_x509_certificates(identity.chain_pem)
    assert root == ca.certificate
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [CUSTODIAN_TLS_NAME]
    leaf.verify_directly_issued_by(ca.certificate)
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    assert public_key_der(key.public_key()) == public_key_der(leaf.public_key())  # type: ignore[arg-type]


def _rsa_csr() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _p384_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: b"", InvalidRequestError),
        (lambda: b"\x30\x03\x02\x01\x00", InvalidRequestError),
        (lambda: b"\x00" * (MAX_CSR_BYTES + 1), InvalidRequestError),
        (_rsa_csr, InvalidRequestError),
        (_p384_csr, InvalidRequestError),
        (lambda: csr_der(generate_identity_key(), signer=generate_identity_key()), RefusedError),
    ],
    ids=["empty", "garbage-der", "too-large", "rsa-key", "p384-key", "bad-signature"],
)
def test_csr_refused(make: object, error: type[CustodianError]) -> None:
    with pytest.raises(error):
        csr_public_key(make())  # type: ignore[operator]


def test_csr_gives_its_p256_key() -> None:
    key = generate_identity_key()
    assert public_key_der(csr_public_key(csr_der(key))) == public_key_der(key)
