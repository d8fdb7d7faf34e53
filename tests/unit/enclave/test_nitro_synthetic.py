"""Nitro documents from a synthetic AWS-shaped PKI (testkit.nitro): every check, one refusal each.

The real documents (test_nitro_vectors) prove the verifier reads AWS's
format; these prove each check refuses what it should, with the synthetic
root trusted by this test alone (``trusting_root``), and appraisal end to end:
claims, binding through the nonce, manifest PCRs, debug mode.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from enclave import identity
from enclave.attestation import AttestedClaims, ReferenceValues, appraise, nitro
from enclave.attestation.interface import Evidence
from enclave.attestation.measurement import code_event, code_sha384, config_event, model_event
from enclave.errors import BindingError, EvidenceError, ManifestError, PolicyError
from testkit.nitro import (
    ENCLAVE_PCRS,
    TPM_PCRS,
    NitroPki,
    SignedBy,
    _certificate,
    document,
    payload,
    registers,
    sign,
    trusting_root,
)

CA_DER = b"test custodian ca"
MODEL = hashlib.sha384(b"a model").digest()


@pytest.fixture(scope="module")
def pki() -> NitroPki:
    return NitroPki()


@pytest.fixture(autouse=True)
def _trusted(pki: NitroPki) -> Iterator[None]:
    with trusting_root(pki.root_sha256):
        yield


def test_synthetic_document_verifies_only_with_its_root_trusted(
    pki: NitroPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = document(pki.signer(), nonce=bytes(64))
    verified = nitro.verify_document(raw, now=datetime.now(UTC), max_age=nitro.LIVE_MAX_AGE)
    assert verified.registers()["pcr0"].hex() == ENCLAVE_PCRS[0]
    assert "NOT the AWS Nitro Root-G1" in verified.checks[0]
    monkeypatch.setattr(nitro, "TRUSTED_ROOTS_SHA256", frozenset({nitro.AWS_NITRO_ROOT_G1_SHA256}))
    with pytest.raises(EvidenceError, match="not the pinned AWS Nitro Root-G1"):
        nitro.verify_document(raw)


def test_self_signed_document_with_a_proper_timestamp_is_refused(pki: NitroPki) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    start = datetime.now(UTC) - timedelta(minutes=1)
    alone = _certificate(
        "self-signed attester", key, None, not_before=start, lifetime=timedelta(hours=3), path_length=None
    )
    raw = document(SignedBy(key=key, chain=[alone, alone]))
    with pytest.raises(EvidenceError, match="not the pinned AWS Nitro Root-G1"):
        nitro.verify_document(raw)


def _replace_chain(pki: NitroPki, index: int, **changes: Any) -> SignedBy:
    """The chain with certificate ``index`` re-issued with ``changes`` (same key, same issuer)."""
    chain = list(pki.chain)
    issuer = None if index == 0 else (chain[index - 1].subject, pki.keys[index - 1])
    common_name = chain[index].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    options: dict[str, Any] = {
        "not_before": pki.start,
        "lifetime": timedelta(hours=3),
        "path_length": None if index in (0, 4) else 3 - index,
        "ca": index < 4,
    } | changes
    chain[index] = _certificate(str(common_name), pki.keys[index], issuer, **options)
    return SignedBy(key=pki.keys[4], chain=chain)


def _tampered(pki: NitroPki, change: Callable[[dict[str, Any]], None]) -> bytes:
    fields = payload(pki.signer(), nonce=bytes(64))
    change(fields)
    return sign(pki.signer(), fields)


CASES: list[tuple[str, Callable[[NitroPki], bytes], str]] = [
    (
        "intermediate-missing",
        lambda p: _tampered(p, lambda f: f.__setitem__("cabundle", [f["cabundle"][0], *f["cabundle"][2:]])),
        "is issued by",
    ),
    (
        "bundle-reversed",
        lambda p: _tampered(p, lambda f: f.__setitem__("cabundle", f["cabundle"][::-1])),
        "not the pinned",
    ),
    ("leaf-is-a-ca", lambda p: document(_replace_chain(p, 4, ca=True, path_length=0)), "CA certificate"),
    ("ca-not-a-ca", lambda p: document(_replace_chain(p, 2, ca=False)), "not a CA"),
    ("path-length", lambda p: document(_replace_chain(p, 1, path_length=1)), "allows 1 CAs below it"),
    (
        "leaf-expired-at-the-document-time",
        lambda p: document(_replace_chain(p, 4, lifetime=timedelta(minutes=1))),
        "expired at",
    ),
    (
        "leaf-not-yet-valid",
        lambda p: document(_replace_chain(p, 4, not_before=datetime.now(UTC) + timedelta(hours=1))),
        "not valid before",
    ),
    (
        "signed-by-another-key",
        lambda p: document(SignedBy(key=ec.generate_private_key(ec.SECP384R1()), chain=p.chain)),
        "signature does not verify",
    ),
    (
        "leaf-key-p256",
        lambda p: document(
            SignedBy(key=ec.generate_private_key(ec.SECP256R1()), chain=[*p.chain[:4], _p256_leaf(p)])
        ),
        "not ECDSA P-384",
    ),
    (
        "es256-header",
        lambda p: sign(p.signer(), payload(p.signer()), protected=cbor2.dumps({1: -7})),
        "ES384",
    ),
    ("digest-sha256", lambda p: _tampered(p, lambda f: f.__setitem__("digest", "SHA256")), "digest"),
    ("pcr-short", lambda p: _tampered(p, lambda f: f["pcrs"].__setitem__(3, bytes(32))), "48 bytes"),
    ("pcr-index-32", lambda p: _tampered(p, lambda f: f["pcrs"].__setitem__(32, bytes(48))), "0-31"),
    ("no-image-pcrs", lambda p: _tampered(p, lambda f: f["pcrs"].pop(1)), "lacks PCRs 0-2"),
    (
        "both-pcr-maps",
        lambda p: _tampered(p, lambda f: f.__setitem__("nitrotpm_pcrs", {4: bytes(48)})),
        "exactly one",
    ),
    ("nonce-1025", lambda p: _tampered(p, lambda f: f.__setitem__("nonce", bytes(1025))), "1024"),
    ("user-data-text", lambda p: _tampered(p, lambda f: f.__setitem__("user_data", "text")), "user_data"),
    ("timestamp-seconds", lambda p: _tampered(p, lambda f: f.__setitem__("timestamp", 1713379906)), "millis"),
    ("module-id-empty", lambda p: _tampered(p, lambda f: f.__setitem__("module_id", "")), "module_id"),
    ("unknown-field", lambda p: _tampered(p, lambda f: f.__setitem__("debug", True)), "unknown fields"),
    ("empty-cabundle", lambda p: _tampered(p, lambda f: f.__setitem__("cabundle", [])), "cabundle"),
    (
        "certificate-garbage",
        lambda p: _tampered(p, lambda f: f.__setitem__("certificate", b"\x30\x03\x02\x01\x00")),
        "not a DER X.509",
    ),
]


def _p256_leaf(pki: NitroPki) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "p256")]))
        .issuer_name(pki.chain[3].subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(pki.start)
        .not_valid_after(pki.start + timedelta(hours=3))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(pki.keys[3], hashes.SHA384())
    )


@pytest.mark.parametrize(("case", "make", "message"), CASES, ids=[c[0] for c in CASES])
def test_each_broken_document_is_refused_with_its_reason(
    pki: NitroPki, case: str, make: Callable[[NitroPki], bytes], message: str
) -> None:
    with pytest.raises(EvidenceError, match=message):
        nitro.verify_document(make(pki))


# --- the Verifier and appraisal -------------------------------------------------------------


def _claims(platform: str, nonce: bytes) -> tuple[AttestedClaims, ec.EllipticCurvePrivateKey]:
    key = identity.generate_identity_key()
    claims = AttestedClaims(
        nonce=nonce,
        public_key=identity.public_key_der(key),
        deployment="demo",
        platform=platform,
        purpose="attest",
        log=(code_event(), config_event(CA_DER), model_event(MODEL)),
    )
    return claims, key


def _reference(platform: str, **changes: Any) -> ReferenceValues:
    pcrs, pinned = (TPM_PCRS, (4, 7, 12)) if platform == nitro.PLATFORM_TPM else (ENCLAVE_PCRS, (0, 1, 2))
    return ReferenceValues(
        platform=platform,
        allow_simulation=False,
        custodian_ca_sha256=hashlib.sha256(CA_DER).hexdigest(),
        code_sha384=code_sha384().hex(),
        allowed_model_sha384=(MODEL.hex(),),
        **{"registers": registers(pcrs, pinned), **changes},
    )


def _evidence(platform: str, raw: bytes) -> bytes:
    return Evidence(platform, {nitro.PART_DOCUMENT: raw}).to_bytes()


@pytest.mark.parametrize("platform", nitro.PLATFORMS)
def test_appraisal_passes_for_a_bound_document(pki: NitroPki, platform: str) -> None:
    nonce = os.urandom(32)
    claims, _ = _claims(platform, nonce)
    raw = document(pki.signer(), tpm=platform == nitro.PLATFORM_TPM, nonce=claims.report_data())
    appraisal = appraise(
        _evidence(platform, raw),
        claims.to_bytes(),
        ReferenceValues.from_toml(_reference(platform).to_toml()),
        now=datetime.now(UTC),
        nonce=nonce,
        public_key=claims.public_key,
        purpose="attest",
        require_model=True,
    )
    assert appraisal.platform.platform == platform
    assert appraisal.model_sha384 == MODEL


@pytest.mark.parametrize(
    ("bound", "error"),
    [("user_data", BindingError), ("public_key", BindingError), ("nothing", BindingError)],
)
def test_report_data_anywhere_but_the_nonce_is_not_a_binding(pki: NitroPki, bound: str, error: type) -> None:
    claims, _ = _claims(nitro.PLATFORM_ENCLAVE, bytes(32))
    fields = {} if bound == "nothing" else {bound: claims.report_data()}
    raw = document(pki.signer(), **fields)
    with pytest.raises(error, match="nonce is not the expected report data"):
        nitro.NitroVerifier().verify(
            Evidence(nitro.PLATFORM_ENCLAVE, {nitro.PART_DOCUMENT: raw}),
            report_data=claims.report_data(),
            now=datetime.now(UTC),
        )


def test_live_evidence_must_be_recent_and_a_certificates_need_not() -> None:
    older = NitroPki(start=datetime.now(UTC) - timedelta(hours=1))
    claims, _ = _claims(nitro.PLATFORM_ENCLAVE, bytes(32))
    made = datetime.now(UTC) - timedelta(minutes=30)
    evidence = Evidence(
        nitro.PLATFORM_ENCLAVE,
        {nitro.PART_DOCUMENT: document(older.signer(), nonce=claims.report_data(), timestamp=made)},
    )
    with trusting_root(older.root_sha256):
        with pytest.raises(EvidenceError, match="not a live document"):
            nitro.NitroVerifier().verify(evidence, report_data=claims.report_data(), now=datetime.now(UTC))
        later = datetime.now(UTC) + timedelta(days=2)  # the whole chain has expired by then
        verified = nitro.NitroVerifier(max_age=None).verify(
            evidence, report_data=claims.report_data(), now=later
        )
    assert verified.details["timestamp_ms"] == int(made.timestamp() * 1000)
    assert verified.details["checked_at"] == verified.details["timestamp"]


def test_debug_enclave_passes_only_under_allow_debug(pki: NitroPki) -> None:
    nonce = os.urandom(32)
    claims, _ = _claims(nitro.PLATFORM_ENCLAVE, nonce)
    zero = "00" * 48
    pcrs = {**ENCLAVE_PCRS, 0: zero, 1: zero, 2: zero}
    evidence = _evidence(
        nitro.PLATFORM_ENCLAVE, document(pki.signer(), pcrs=pcrs, nonce=claims.report_data())
    )
    common: dict[str, Any] = {
        "now": datetime.now(UTC),
        "nonce": nonce,
        "public_key": claims.public_key,
        "purpose": "attest",
    }
    pinned = {"registers": registers(pcrs, (0, 1, 2))}
    with pytest.raises(EvidenceError, match="debug mode"):
        appraise(evidence, claims.to_bytes(), _reference(nitro.PLATFORM_ENCLAVE, **pinned), **common)
    reference = ReferenceValues.from_toml(
        _reference(nitro.PLATFORM_ENCLAVE, allow_debug=True, **pinned).to_toml()
    )
    assert reference.allow_debug
    appraise(evidence, claims.to_bytes(), reference, **common)


def test_manifest_pcr_mismatch_is_named(pki: NitroPki) -> None:
    nonce = os.urandom(32)
    claims, _ = _claims(nitro.PLATFORM_TPM, nonce)
    raw = document(pki.signer(), tpm=True, nonce=claims.report_data())
    reference = _reference(
        nitro.PLATFORM_TPM, registers={**registers(TPM_PCRS, (4, 7, 12)), "pcr7": "ee" * 48}
    )
    with pytest.raises(PolicyError, match="register pcr7 is"):
        appraise(
            _evidence(nitro.PLATFORM_TPM, raw),
            claims.to_bytes(),
            reference,
            now=datetime.now(UTC),
            nonce=nonce,
            public_key=claims.public_key,
            purpose="attest",
        )


def test_enclave_document_is_refused_as_nitro_tpm_evidence(pki: NitroPki) -> None:
    claims, _ = _claims(nitro.PLATFORM_TPM, bytes(32))
    raw = document(pki.signer(), nonce=claims.report_data())
    with pytest.raises(EvidenceError, match="not nitro-tpm"):
        nitro.NitroVerifier(nitro.PLATFORM_TPM).verify(
            Evidence(nitro.PLATFORM_TPM, {nitro.PART_DOCUMENT: raw}),
            report_data=claims.report_data(),
            now=datetime.now(UTC),
        )


@pytest.mark.parametrize(
    ("platform", "pins", "message"),
    [
        (nitro.PLATFORM_ENCLAVE, (0, 1), "pcr2"),
        (nitro.PLATFORM_TPM, (4, 7), "pcr12"),
        (nitro.PLATFORM_TPM, (4, 7, 12, 24), "never in nitro-tpm evidence"),
    ],
    ids=["enclave-without-pcr2", "tpm-without-pcr12", "tpm-pcr24"],
)
def test_manifest_must_pin_the_image_pcrs(platform: str, pins: tuple[int, ...], message: str) -> None:
    pcrs = {**TPM_PCRS, 24: "00" * 48} if platform == nitro.PLATFORM_TPM else ENCLAVE_PCRS
    with pytest.raises(ManifestError, match=message):
        _reference(platform, registers=registers(pcrs, pins))


def test_verifier_names_a_platform_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="nitro-enclave, nitro-tpm"):
        nitro.NitroVerifier("nitro")
