"""AWS Nitro attestation documents: the real ones in ../shared/vectors/nitro, and refusals.

Provenance: ../shared/vectors/MANIFEST.md (blocky/nitrite and mithril-security/blindai
test data: real documents from Nitro Enclaves in us-east-1 and eu-west-3, and
nitrite's self-signed negative sample). Expected parsed values:
../shared/vectors/expected_values.json (an independent parser).
"""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclave.attestation import nitro
from enclave.attestation.interface import Evidence
from enclave.attestation.nitro_document import decode_document_text, parse_document
from enclave.errors import BindingError, EvidenceError

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
REAL = [
    "nitro/blindai_nitro_attestation_document_valid.cbor",
    "nitro/blocky_nitro_attestation.b64",
    "nitro/blocky_nitro_attestation_debug.b64",
]
PRODUCTION = "nitro/blocky_nitro_attestation.b64"
DEBUG = ["nitro/blindai_nitro_attestation_document_valid.cbor", "nitro/blocky_nitro_attestation_debug.b64"]
SELF_SIGNED = "nitro/blocky_selfsigned_attestation.b64"


def _read(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.fail(f"Nitro test vector {path} is missing: check out ../shared/vectors next to the repo")
    return path.read_bytes()


def _document(name: str) -> bytes:
    return decode_document_text(_read(name))


def _expected(name: str) -> dict[str, Any]:
    values: dict[str, Any] = json.loads(_read("expected_values.json"))["nitro"][name]
    return values


def test_pinned_root_is_the_one_aws_publishes() -> None:
    """The zip's SHA-256 is the value AWS documents; the pin is its root.pem's DER SHA-256."""
    archive = VECTORS / "nitro/blocky_AWS_NitroEnclaves_Root-G1.zip"
    published = _read("nitro/blocky_AWS_NitroEnclaves_Root-G1.sha256.hex").decode().split()[0]
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == published
    with zipfile.ZipFile(archive) as zipped:
        root = x509.load_pem_x509_certificate(zipped.read("root.pem"))
    assert hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest() == nitro.AWS_NITRO_ROOT_G1_SHA256
    copy = x509.load_pem_x509_certificate(_read("nitro/blindai_aws_nitro_enclaves_rootca.pem"))
    assert copy == root
    assert nitro.TRUSTED_ROOTS_SHA256 == frozenset({nitro.AWS_NITRO_ROOT_G1_SHA256})


@pytest.mark.parametrize("name", REAL)
def test_real_document_verifies_at_its_own_time_with_the_expected_values(name: str) -> None:
    expected = _expected(name)
    verified = nitro.verify_document(_document(name))
    document = verified.document
    assert verified.checked_at == document.timestamp
    assert document.module_id == expected["module_id"]
    assert document.digest == expected["digest"]
    assert document.timestamp_ms == expected["timestamp_ms"]
    assert document.timestamp.isoformat() == expected["timestamp_utc"]
    pcrs = expected["pcrs"]
    assert {str(i): v.hex() for i, v in document.pcrs.items() if str(i) in pcrs} == pcrs
    if expected["all_other_pcrs"] == "zero":
        assert all(not any(v) for i, v in document.pcrs.items() if str(i) not in pcrs)
    for field in ("nonce", "user_data", "public_key"):
        value = getattr(document, field)
        assert (value.hex() if value is not None else None) == expected[field], field
    assert len(document.cabundle) == expected["cabundle_len"]
    leaf = verified.chain[-1]
    assert leaf.not_valid_after_utc.isoformat() == expected["leaf_not_after"]
    assert leaf.subject.rfc4514_string().startswith(expected["leaf_cn"])
    assert verified.debug is expected["debug_mode"]
    assert verified.platform == nitro.PLATFORM_ENCLAVE
    assert verified.registers()["pcr0"] == document.pcrs[0]
    assert len(verified.checks) == 3


def test_production_pcrs_are_the_manifests_values() -> None:
    document = nitro.verify_document(_document(PRODUCTION)).document
    assert document.pcrs[0].hex().startswith("e72a46ca80a260fb")
    assert document.pcrs[4].hex().startswith("45706d7b621e4620")


def test_raw_cbor_and_base64_read_alike() -> None:
    raw = _document(PRODUCTION)
    assert decode_document_text(raw) == raw
    assert decode_document_text(base64.b64encode(raw)) == raw
    with pytest.raises(EvidenceError, match="neither CBOR nor base64"):
        decode_document_text(b"not a document!")


def test_self_signed_sample_is_refused() -> None:
    with pytest.raises(EvidenceError):
        nitro.verify_document(_document(SELF_SIGNED))


@pytest.mark.parametrize("name", REAL)
def test_recorded_document_is_refused_once_its_certificates_expired(name: str) -> None:
    document = _document(name)
    later = parse_document(document).timestamp + timedelta(hours=4)
    with pytest.raises(EvidenceError, match="is not valid at"):
        nitro.verify_document(document, at=later)


@pytest.mark.parametrize("name", DEBUG)
def test_debug_enclave_is_refused_unless_allowed(name: str) -> None:
    verified = nitro.verify_document(_document(name))
    assert verified.debug
    with pytest.raises(EvidenceError, match="debug mode"):
        nitro.check_platform(verified, nitro.PLATFORM_ENCLAVE, allow_debug=False)
    nitro.check_platform(verified, nitro.PLATFORM_ENCLAVE, allow_debug=True)


def test_production_enclave_is_not_debug() -> None:
    verified = nitro.verify_document(_document(PRODUCTION))
    assert not verified.debug
    nitro.check_platform(verified, nitro.PLATFORM_ENCLAVE, allow_debug=False)


def test_enclave_document_is_not_nitro_tpm_evidence() -> None:
    verified = nitro.verify_document(_document(PRODUCTION))
    with pytest.raises(EvidenceError, match="not nitro-tpm"):
        nitro.check_platform(verified, nitro.PLATFORM_TPM, allow_debug=False)


def test_replayed_real_document_is_refused_for_its_nonce() -> None:
    document = _document(PRODUCTION)
    when = parse_document(document).timestamp
    evidence = Evidence(nitro.PLATFORM_ENCLAVE, {nitro.PART_DOCUMENT: document})
    verifier = nitro.NitroVerifier(nitro.PLATFORM_ENCLAVE, max_age=None)
    with pytest.raises(BindingError, match="nonce is not the expected report data"):
        verifier.verify(evidence, report_data=bytes(64), now=when)


def test_real_document_is_refused_as_live_evidence_today() -> None:
    """Bound or not, a 2024 document is not live in 2026: the age check names it."""
    document = _document(PRODUCTION)
    nonce = parse_document(document).nonce
    assert nonce is not None
    evidence = Evidence(nitro.PLATFORM_ENCLAVE, {nitro.PART_DOCUMENT: document})
    with pytest.raises(EvidenceError, match="not a live document"):
        nitro.NitroVerifier().verify(evidence, report_data=nonce, now=datetime(2026, 12, 1, tzinfo=UTC))


def test_document_from_the_future_is_refused() -> None:
    document = _document(PRODUCTION)
    before = parse_document(document).timestamp - timedelta(hours=1)
    with pytest.raises(EvidenceError, match="after"):
        nitro.verify_document(document, now=before)


def _signed_spans(document: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of the protected header, payload and signature inside the document."""
    parsed = parse_document(document)
    spans = []
    for name, part in (("protected", parsed.protected), ("payload", parsed.payload)):
        start = document.index(part)
        spans.append((name, start, start + len(part)))
    spans.append(("signature", len(document) - 96, len(document)))
    return spans


@pytest.mark.parametrize(
    ("name", "step"), [(PRODUCTION, 1), ("nitro/blindai_nitro_attestation_document_valid.cbor", 5)]
)
def test_every_flipped_byte_of_the_signed_parts_is_refused(name: str, step: int) -> None:
    """Each byte of the protected header, payload and signature flipped (every ``step``-th of the payload)."""
    document = _document(name)
    spans = {n: (s, e) for n, s, e in _signed_spans(document)}
    positions = [
        *range(*spans["protected"]),
        *range(*spans["signature"]),
        *range(spans["payload"][0], spans["payload"][1], step),
    ]
    assert len(positions) > 2000 // step
    for position in positions:
        tampered = bytearray(document)
        tampered[position] ^= 0x01
        with pytest.raises(EvidenceError):
            nitro.verify_document(bytes(tampered))
