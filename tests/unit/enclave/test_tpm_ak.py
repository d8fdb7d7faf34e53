"""AK certificate chains on a generated PKI: trust established, and every refusal.

Also what makes an AK an AK: a TPMT_PUBLIC with the attributes of a TPM-made restricted
signing key, and a certificate whose extended key usage is tcg-kp-AIKCertificate."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclave.attestation.interface import Evidence
from enclave.attestation.tpm import TpmVerifier
from enclave.attestation.tpm_ak import TCG_KP_AIK_CERTIFICATE, load_ak
from enclave.errors import EvidenceError

from .test_tpm_marshal import (
    AK_ATTRIBUTES,
    AK_ENCODINGS,
    NOW,
    REPORT_DATA,
    SELECTION,
    PrivateKey,
    SoftwareTpm,
    marshal_public,
    replace_parts,
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
    usages: list[x509.ObjectIdentifier] | None = None,
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
    if usages:  # an empty ExtendedKeyUsage cannot be encoded: [] means no extension
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_pki(
    ak: PrivateKey,
    *,
    intermediate_ca: bool = True,
    leaf_days: int = 365,
    leaf_usages: list[x509.ObjectIdentifier] | None = None,
) -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("AK Root", root_key.public_key(), "AK Root", root_key, ca=True)
    inter = _cert(
        "AK Intermediate", inter_key.public_key(), "AK Root", root_key, ca=intermediate_ca, path_length=0
    )
    usages = [TCG_KP_AIK_CERTIFICATE] if leaf_usages is None else leaf_usages
    leaf = _cert("AK", ak.public_key(), "AK Intermediate", inter_key, ca=False, days=leaf_days, usages=usages)
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


# --- what makes an AK certificate an AK certificate ---

USAGE_REFUSALS: list[tuple[str, list[x509.ObjectIdentifier], str]] = [
    ("no-eku", [], "has no extended key usage"),
    ("client-auth", [ExtendedKeyUsageOID.CLIENT_AUTH], "clientAuth"),
    ("server-auth", [ExtendedKeyUsageOID.SERVER_AUTH], "serverAuth"),
    ("aik-and-client-auth", [TCG_KP_AIK_CERTIFICATE, ExtendedKeyUsageOID.CLIENT_AUTH], "clientAuth"),
    ("any-usage", [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], "anyExtendedKeyUsage"),
    # The usage of an EK certificate (Google's AK certificates carry it): not an AK certificate.
    ("ek-certificate", [x509.ObjectIdentifier("2.23.133.8.1")], "lacks tcg-kp-AIKCertificate"),
]


@pytest.mark.parametrize(
    ("usages", "reason"), [r[1:] for r in USAGE_REFUSALS], ids=[r[0] for r in USAGE_REFUSALS]
)
def test_ak_certificate_without_the_aik_usage_alone_is_refused(
    usages: list[x509.ObjectIdentifier], reason: str
) -> None:
    tpm = tpm_for()
    pki = make_pki(tpm.key, leaf_usages=usages)
    evidence = tpm.evidence(REPORT_DATA, SELECTION, ak_cert=der(pki.leaf), ak_chain=pem(pki.intermediate))
    with pytest.raises(EvidenceError, match=reason):
        TpmVerifier(ak_roots=[pki.root]).verify(evidence, report_data=REPORT_DATA, now=NOW)


@pytest.mark.parametrize("encoding", [e for e in AK_ENCODINGS if e != "tpmt_public"])
def test_bare_key_ak_is_refused_when_ak_roots_are_in_play(encoding: str) -> None:
    """A SubjectPublicKeyInfo or JWK says nothing of a TPM: any software key could be one."""
    tpm = tpm_for()
    pki = make_pki(tpm.key)
    evidence = replace_parts(
        tpm.evidence(REPORT_DATA, SELECTION, ak_cert=der(pki.leaf), ak_chain=pem(pki.intermediate)),
        ak=AK_ENCODINGS[encoding](tpm),
    )
    with pytest.raises(EvidenceError, match=f"bare {'spki' if encoding == 'pem' else encoding} key"):
        TpmVerifier(ak_roots=[pki.root]).verify(evidence, report_data=REPORT_DATA, now=NOW)
    # Without roots (a recorded vector viewed as it is) the quote still verifies, its AK untrusted.
    claims = TpmVerifier().verify(evidence, report_data=REPORT_DATA, now=NOW)
    assert claims.details["ak_trust"] == "none"
    # A verifier told to trust the AK by its Name (the custodian) refuses it without roots too.
    with pytest.raises(EvidenceError, match="not a TPMT_PUBLIC"):
        TpmVerifier(require_tpm_public=True).verify(evidence, report_data=REPORT_DATA, now=NOW)


FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 4, 1 << 5
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
ATTRIBUTE_REFUSALS = [
    ("not-restricted", AK_ATTRIBUTES & ~RESTRICTED, "missing: restricted"),
    ("not-sign", AK_ATTRIBUTES & ~SIGN, "missing: sign"),
    ("not-fixed-tpm", AK_ATTRIBUTES & ~FIXED_TPM, "missing: fixedTPM"),
    ("not-fixed-parent", AK_ATTRIBUTES & ~FIXED_PARENT, "missing: fixedParent"),
    ("imported", AK_ATTRIBUTES & ~SENSITIVE_DATA_ORIGIN, "missing: sensitiveDataOrigin"),
    ("also-decrypt", AK_ATTRIBUTES | DECRYPT, "missing: none; decrypt must be clear"),
]


@pytest.mark.parametrize(
    ("attributes", "reason"), [r[1:] for r in ATTRIBUTE_REFUSALS], ids=[r[0] for r in ATTRIBUTE_REFUSALS]
)
def test_ak_without_the_attributes_of_a_tpm_made_restricted_signing_key_is_refused(
    attributes: int, reason: str
) -> None:
    tpm = tpm_for()
    ak = marshal_public(tpm.key, attributes=attributes, scheme=tpm.scheme, scheme_hash=tpm.hash_name)
    with pytest.raises(EvidenceError, match=reason):
        load_ak(ak)
    pki = make_pki(tpm.key)
    evidence = replace_parts(
        tpm.evidence(REPORT_DATA, SELECTION, ak_cert=der(pki.leaf), ak_chain=pem(pki.intermediate)), ak=ak
    )
    with pytest.raises(EvidenceError, match=reason):
        TpmVerifier(ak_roots=[pki.root]).verify(evidence, report_data=REPORT_DATA, now=NOW)
