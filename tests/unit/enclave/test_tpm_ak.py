"""AK certificate chains (GCE style) on a generated PKI: trust established, and every refusal."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave.attestation.interface import Evidence
from enclave.attestation.tpm import TpmVerifier
from enclave.errors import EvidenceError

from .test_tpm_marshal import (
    NOW,
    REPORT_DATA,
    SELECTION,
    PrivateKey,
    SoftwareTpm,
    tpm_for,
    without,
)

# --- AK certificates ---


@dataclass(frozen=True)
class Pki:
    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate


def _cert(
    subject: str,
    public: Any,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    path_length: int | None = None,
    days: int = 3650,
) -> x509.Certificate:
    start = NOW - datetime.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    )
    return builder.sign(signer, hashes.SHA256())


def make_pki(ak: PrivateKey, *, intermediate_ca: bool = True, leaf_days: int = 365) -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("AK Root", root_key.public_key(), "AK Root", root_key, ca=True)
    inter = _cert(
        "AK Intermediate", inter_key.public_key(), "AK Root", root_key, ca=intermediate_ca, path_length=0
    )
    leaf = _cert("AK", ak.public_key(), "AK Intermediate", inter_key, ca=False, days=leaf_days)
    return Pki(root=root, intermediate=inter, leaf=leaf)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_ak_certificate_establishes_trust() -> None:
    tpm = tpm_for()
    pki = make_pki(tpm.key)
    evidence = tpm.evidence(REPORT_DATA, SELECTION, ak_cert=der(pki.leaf), ak_chain=pem(pki.intermediate))
    claims = TpmVerifier(ak_roots=[pki.root]).verify(evidence, report_data=REPORT_DATA, now=NOW)
    assert claims.details["ak_trust"] == "certificate"
    # The same roots as collateral, the intermediate from the relying party rather than the evidence.
    no_chain = without(evidence, "ak_chain")
    collateral = {"ak_roots": der(pki.root), "ak_intermediates": pem(pki.intermediate)}
    claims = TpmVerifier().verify(no_chain, report_data=REPORT_DATA, now=NOW, collateral=collateral)
    assert claims.details["ak_trust"] == "certificate"


CertRefusal = Callable[[SoftwareTpm, Pki], tuple[Evidence, datetime.datetime]]
CERT_REFUSALS: list[tuple[str, CertRefusal, str]] = [
    ("no-cert", lambda t, p: (t.evidence(REPORT_DATA, SELECTION), NOW), "no ak_cert"),
    (
        "expired",
        lambda t, p: (
            t.evidence(REPORT_DATA, SELECTION, ak_cert=der(p.leaf), ak_chain=pem(p.intermediate)),
            NOW + datetime.timedelta(days=400),
        ),
        "not valid at",
    ),
    (
        "no-intermediate",
        lambda t, p: (t.evidence(REPORT_DATA, SELECTION, ak_cert=der(p.leaf)), NOW),
        "chain stops",
    ),
    (
        "cert-for-other-key",
        lambda t, p: (
            t.evidence(
                REPORT_DATA,
                SELECTION,
                ak_cert=der(make_pki(ec.generate_private_key(ec.SECP256R1())).leaf),
                ak_chain=pem(p.intermediate),
            ),
            NOW,
        ),
        "another key",
    ),
    (
        "leaf-as-chain-ca",
        lambda t, p: (t.evidence(REPORT_DATA, SELECTION, ak_cert=der(p.leaf), ak_chain=pem(p.leaf)), NOW),
        "chain stops",
    ),
    (
        "two-certs",
        lambda t, p: (t.evidence(REPORT_DATA, SELECTION, ak_cert=pem(p.leaf, p.leaf)), NOW),
        "expected one",
    ),
    (
        "garbage-cert",
        lambda t, p: (t.evidence(REPORT_DATA, SELECTION, ak_cert=b"\x30\x03junk"), NOW),
        "X.509",
    ),
]


@pytest.mark.parametrize(
    ("make", "reason"), [r[1:] for r in CERT_REFUSALS], ids=[r[0] for r in CERT_REFUSALS]
)
def test_ak_certificate_refusals(make: CertRefusal, reason: str) -> None:
    tpm = tpm_for()
    pki = make_pki(tpm.key)
    evidence, now = make(tpm, pki)
    with pytest.raises(EvidenceError, match=reason):
        TpmVerifier(ak_roots=[pki.root]).verify(evidence, report_data=REPORT_DATA, now=now)


def test_intermediate_that_is_not_a_ca_is_refused() -> None:
    tpm = tpm_for()
    pki = make_pki(tpm.key, intermediate_ca=False)
    evidence = tpm.evidence(REPORT_DATA, SELECTION, ak_cert=der(pki.leaf), ak_chain=pem(pki.intermediate))
    with pytest.raises(EvidenceError, match="is not a CA"):
        TpmVerifier(ak_roots=[pki.root]).verify(evidence, report_data=REPORT_DATA, now=NOW)
