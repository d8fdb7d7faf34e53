"""An X.509 version other than v1 or v3 is the parsers' own error, never cryptography's InvalidVersion."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from enclave.attestation import dcap_pck, sev_snp_certs, tpm_ak, tpm_credential
from enclave.errors import EvidenceError
from enclave.identity import FormatError, read_attested_certificate

VECTORS = Path(__file__).resolve().parents[4] / "shared" / "vectors"
# TBSCertificate's explicit [0] version field, v3 (INTEGER 2).
_VERSION_V3 = bytes.fromhex("a003020102")


def version_four(der: bytes) -> bytes:
    """``der`` with its version field claiming v4, which no parser may pass through as its own exception."""
    assert der.count(_VERSION_V3) >= 1
    return der.replace(_VERSION_V3, bytes.fromhex("a003020103"), 1)


@pytest.fixture(scope="module")
def bad_der() -> bytes:
    root = (VECTORS / "intel-collateral" / "dcapqvl_TrustedRootCA.der").read_bytes()
    der = version_four(root)
    with pytest.raises(x509.InvalidVersion):  # the premise: cryptography raises a bare Exception
        x509.load_der_x509_certificate(der)
    return der


def _pem(der: bytes) -> bytes:
    return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"


PARSERS: dict[str, Callable[[bytes], object]] = {
    "dcap-pck-der": lambda der: dcap_pck.load_certificate_der(der, "PCK certificate"),
    "dcap-chain-pem": lambda der: dcap_pck.load_certificate_chain_pem(_pem(der), "PCK chain"),
    "sev-snp": lambda der: sev_snp_certs.load_certificates(der, "VCEK"),
    "tpm-ak": lambda der: tpm_ak.load_certificates(der, "AK certificate"),
    "tpm-ek": lambda der: tpm_credential.load_ek_certificate(der),
}


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
def test_a_version_4_certificate_is_evidence_error(parser: Callable[[bytes], object], bad_der: bytes) -> None:
    with pytest.raises(EvidenceError):
        parser(bad_der)


def test_an_enclave_certificate_of_version_4_is_a_format_error(bad_der: bytes) -> None:
    with pytest.raises(FormatError):
        read_attested_certificate(_pem(bad_der))
