"""Real TPM 2.0 quotes from ../shared/vectors/tpm (provenance in its MANIFEST.md).

Google Compute Engine's vTPM (go-tpm-tools protobuf, AK certificate to Google's
roots), keylime's and trustee's software-TPM samples. Google's AK certificate
chains to Google's roots but carries the EK certificate's extended key usage
(2.23.133.8.1), not tcg-kp-AIKCertificate, so it is no AK certificate to our
verifier. Every quote must verify
and reproduce expected_values.json; flipped bytes and wrong nonces are refused.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave.attestation import tpm, tpm_chain
from enclave.attestation.interface import Evidence
from enclave.attestation.tpm import QuoteClaims, TpmVerifier, verify_quote
from enclave.attestation.tpm_ak import load_ak, load_certificates, verify_ak_certificate
from enclave.attestation.tpm_structures import parse_attest, parse_signature
from enclave.errors import AttestationError, BindingError, EvidenceError

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
GCE_PB = "tpm/gotpmtools_gce-cos-85-no-nonce.pb"
GCE_ROOT = "tpm/gotpmtools_ca-certs_tpm_ek_root_1.cer"
GCE_INTERMEDIATE = "tpm/gotpmtools_ca-certs_tpm_ek_intermediate_2.crt"
# Within the COS-85 AK certificate's validity (2021-08-31 .. 2051-08-24).
GCE_NOW = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)
_BANKS = {4: "sha1", 11: "sha256", 12: "sha384"}  # go-tpm-tools HashAlgo enum = TPM_ALG_ID


def vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.fail(f"test vector {path} is missing: the shared vectors must be checked out next to the repo")
    return path.read_bytes()


def expected(section: str, name: str) -> dict[str, Any]:
    doc = json.loads(vector("expected_values.json"))
    entry: dict[str, Any] = doc[section][name]
    return entry


# --- a minimal protobuf wire-format reader (for the go-tpm-tools Attestation) ---


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def protobuf_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs: varints as int, length-delimited and fixed fields as bytes."""
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, offset = _varint(data, offset)
            yield number, value
            continue
        if wire == 2:
            size, offset = _varint(data, offset)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if offset + size > len(data):
            raise ValueError("truncated field")
        yield number, data[offset : offset + size]
        offset += size


def _bytes_fields(data: bytes, number: int) -> list[bytes]:
    return [v for n, v in protobuf_fields(data) if n == number and isinstance(v, bytes)]


@dataclass(frozen=True)
class GceQuote:
    bank: str
    quote: bytes
    signature: bytes
    pcrs: dict[int, bytes]


@dataclass(frozen=True)
class GceAttestation:
    ak_pub: bytes
    quotes: list[GceQuote]
    ak_cert: bytes


def gce_attestation() -> GceAttestation:
    """go-tpm-tools attest.Attestation.

    Fields: 1 ak_pub, 2 quotes {1 quote, 2 raw_sig, 3 pcrs {1 hash, 2 map}}, 6 ak_cert.
    """
    data = vector(GCE_PB)
    quotes = []
    for raw in _bytes_fields(data, 2):
        (pcrs_msg,) = _bytes_fields(raw, 3)
        hash_ids = [v for n, v in protobuf_fields(pcrs_msg) if n == 1 and isinstance(v, int)]
        values: dict[int, bytes] = {}
        for entry in _bytes_fields(pcrs_msg, 2):
            keys = [v for n, v in protobuf_fields(entry) if n == 1 and isinstance(v, int)]
            values[keys[0] if keys else 0] = _bytes_fields(entry, 2)[0]  # proto3 omits key 0
        (quote,), (signature,) = _bytes_fields(raw, 1), _bytes_fields(raw, 2)
        quotes.append(GceQuote(bank=_BANKS[hash_ids[0]], quote=quote, signature=signature, pcrs=values))
    (ak_pub,), (ak_cert,) = _bytes_fields(data, 1), _bytes_fields(data, 6)
    return GceAttestation(ak_pub=ak_pub, quotes=quotes, ak_cert=ak_cert)


# --- the other sample formats ---


def keylime_pcrs() -> dict[int, bytes]:
    """tpm2-tools' in-memory dump (little-endian): TPML_PCR_SELECTION (4 + 16 x 8), u32 n, n x TPML_DIGEST."""
    blob = vector("tpm/derived_keylime_quote.pcrs_tpm2tools.bin")
    count = int.from_bytes(blob[0:4], "little")
    indices = []
    for n in range(count):
        entry = blob[4 + 8 * n : 12 + 8 * n]
        size, bitmap = entry[2], entry[3:7]
        indices += [i for i in range(8 * size) if bitmap[i // 8] >> (i % 8) & 1]
    digests = []
    offset = 132 + 4
    for _ in range(int.from_bytes(blob[132:136], "little")):
        for k in range(int.from_bytes(blob[offset : offset + 4], "little")):
            at = offset + 4 + 66 * k
            digests.append(blob[at + 2 : at + 2 + int.from_bytes(blob[at : at + 2], "little")])
        offset += 4 + 8 * 66
    return dict(zip(indices, digests, strict=True))


def keylime_parts() -> tuple[bytes, bytes, bytes]:
    return (
        vector("tpm/derived_keylime_quote.tpms_attest.bin"),
        vector("tpm/derived_keylime_quote.tpmt_signature.bin"),
        vector("tpm/derived_keylime_quote.ak_pub.pem"),
    )


def trustee_evidence() -> tuple[bytes, bytes, bytes, dict[int, bytes]]:
    doc = json.loads(vector("tpm/trustee_tpm_evidence.json"))
    quote = doc["tpm_quote"]
    pcrs = {i: bytes.fromhex(v) for i, v in enumerate(quote["pcrs"])}
    return (
        base64.b64decode(quote["message"]),
        base64.b64decode(quote["signature"]),
        base64.b64decode(doc["ak_public"]),
        pcrs,
    )


def pcr_json(pcrs: dict[str, dict[int, bytes]]) -> bytes:
    return json.dumps({b: {str(i): v.hex() for i, v in vs.items()} for b, vs in pcrs.items()}).encode()


def assert_matches_expected(claims: QuoteClaims, attest: dict[str, Any], pcrs: dict[str, str] | None) -> None:
    parsed = claims.attest
    assert f"{parsed.type:#x}" == attest["type"]
    assert parsed.extra_data.hex() == attest["extra_data"]
    assert parsed.clock_info.clock == attest["clock"]
    assert parsed.clock_info.reset_count == attest["reset_count"]
    assert parsed.clock_info.restart_count == attest["restart_count"]
    assert f"{parsed.firmware_version:#018x}" == attest["firmware_version"]
    assert parsed.pcr_digest.hex() == attest["pcr_digest"]
    assert [[f"{s.hash_alg:#x}", list(s.pcrs)] for s in parsed.pcr_selection] == attest["pcr_select"]
    if pcrs is not None:
        (bank,) = claims.pcrs
        assert {str(i): v.hex() for i, v in claims.pcrs[bank].items()} == pcrs


# --- Google Compute Engine ---


def test_gce_quotes_verify_and_reproduce_expected_values() -> None:
    gce = gce_attestation()
    want = expected("tpm", GCE_PB)
    ak = load_ak(gce.ak_pub)
    assert ak.encoding == "tpmt_public"
    assert [q.bank for q in gce.quotes] == ["sha1", "sha256", "sha384"]
    for quote, exp in zip(gce.quotes, want["quotes"], strict=True):
        claims = verify_quote(quote.quote, quote.signature, ak, {quote.bank: quote.pcrs}, nonce=b"")
        assert exp["bank"] == quote.bank
        assert claims.signature.scheme == "rsassa"
        assert claims.signature.hash_name == "sha256"  # the AK's scheme hash, even for the sha1/sha384 banks
        assert claims.nonce.hex() == want["expected_nonce_hex"]
        assert_matches_expected(claims, exp["attest"], exp["pcrs"])


def test_gce_ak_certificate_chains_to_google_root() -> None:
    gce = gce_attestation()
    chain = tpm_chain.walk_chain(
        load_certificates(gce.ak_cert, "ak_cert")[0],
        roots=load_certificates(vector(GCE_ROOT), "root"),
        intermediates=load_certificates(vector(GCE_INTERMEDIATE), "intermediate"),
        when=GCE_NOW,
        role="AK",
    )
    assert len(chain) == 3


def test_gce_ak_certificate_is_refused_for_its_ek_certificate_usage() -> None:
    gce = gce_attestation()
    with pytest.raises(EvidenceError, match=r"\(2\.23\.133\.8\.1\) lacks tcg-kp-AIKCertificate"):
        verify_ak_certificate(
            load_certificates(gce.ak_cert, "ak_cert")[0],
            load_ak(gce.ak_pub),
            roots=load_certificates(vector(GCE_ROOT), "root"),
            intermediates=load_certificates(vector(GCE_INTERMEDIATE), "intermediate"),
            now=GCE_NOW,
        )


@pytest.mark.parametrize(
    ("root", "intermediate", "now", "reason"),
    [
        (GCE_ROOT, GCE_INTERMEDIATE, datetime.datetime(2019, 1, 1, tzinfo=datetime.UTC), "not valid at"),
        (GCE_ROOT, "tpm/gotpmtools_ca-certs_tpm_ek_intermediate_3.crt", GCE_NOW, "chain stops"),
        ("tpm/gotpmtools_ca-certs_gcp_ek_ak_ca_root.crt", GCE_INTERMEDIATE, GCE_NOW, "chain stops"),
    ],
    ids=["intermediate-before-validity", "wrong-intermediate", "other-google-root"],
)
def test_gce_ak_certificate_refusals(
    root: str, intermediate: str, now: datetime.datetime, reason: str
) -> None:
    gce = gce_attestation()
    with pytest.raises(EvidenceError, match=reason):
        tpm_chain.walk_chain(
            load_certificates(gce.ak_cert, "ak_cert")[0],
            roots=load_certificates(vector(root), "root"),
            intermediates=load_certificates(vector(intermediate), "intermediate"),
            when=now,
            role="AK",
        )


def test_gce_ak_certificate_does_not_vouch_for_a_bare_key() -> None:
    gce = gce_attestation()
    _, _, other_ak, _ = trustee_evidence()  # a SubjectPublicKeyInfo
    with pytest.raises(EvidenceError, match="bare spki key"):
        verify_ak_certificate(
            load_certificates(gce.ak_cert, "ak_cert")[0],
            load_ak(other_ak),
            roots=load_certificates(vector(GCE_ROOT), "root"),
            intermediates=load_certificates(vector(GCE_INTERMEDIATE), "intermediate"),
            now=GCE_NOW,
        )


def _gce_evidence(gce: GceAttestation) -> Evidence:
    quote = next(q for q in gce.quotes if q.bank == "sha256")
    return Evidence(
        platform="tpm",
        parts={
            "quote": quote.quote,
            "signature": quote.signature,
            "ak": gce.ak_pub,
            "pcrs": pcr_json({"sha256": quote.pcrs}),
            "ak_cert": gce.ak_cert,
        },
    )


def test_tpm_verifier_refuses_gce_quote_without_our_report_data() -> None:
    gce = gce_attestation()
    verifier = TpmVerifier(ak_roots=load_certificates(vector(GCE_ROOT), "root"))
    collateral = {"ak_intermediates": vector(GCE_INTERMEDIATE)}
    with pytest.raises(BindingError, match="nonce"):
        verifier.verify(_gce_evidence(gce), report_data=bytes(64), now=GCE_NOW, collateral=collateral)


# --- trustee and keylime (software TPMs) ---


def test_trustee_quote_verifies_and_reproduces_expected_values() -> None:
    quote, signature, ak, pcrs = trustee_evidence()
    want = expected("tpm", "tpm/trustee_tpm_evidence.json")
    claims = verify_quote(
        quote, signature, ak, {"sha256": pcrs}, nonce=bytes.fromhex(want["attest"]["extra_data"])
    )
    assert_matches_expected(claims, want["attest"], want["pcrs_sha256"])


def test_trustee_evidence_through_tpm_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    quote, signature, ak, pcrs = trustee_evidence()
    report_data = parse_attest(quote).extra_data
    assert len(report_data) == 64
    evidence = Evidence(
        platform="tpm",
        parts={"quote": quote, "signature": signature, "ak": ak, "pcrs": pcr_json({"sha256": pcrs})},
    )
    # The tpm platform qualifies quotes with SHA-256(report data), and this recorded quote carries
    # 64 raw bytes whose preimage nobody knows: as Custos evidence it is refused...
    with pytest.raises(BindingError, match="nonce"):
        TpmVerifier().verify(evidence, report_data=report_data, now=GCE_NOW)
    # ...and with the qualifying data taken as-is, the rest of the verifier runs over real evidence.
    monkeypatch.setattr(tpm, "qualifying_data", lambda data: data)
    claims = TpmVerifier().verify(evidence, report_data=report_data, now=GCE_NOW)
    assert claims.platform == "tpm"
    assert not claims.simulated
    assert claims.report_data == report_data
    assert claims.log_register == "pcr.sha256.15"
    assert claims.log_hash == "sha256"
    assert claims.registers["pcr.sha256.17"] == b"\xff" * 32
    assert len(claims.registers) == 24
    assert claims.details["ak_trust"] == "none"
    assert claims.details["firmware_version"] == "0x2019102300163636"
    assert claims.details["clock"] == 1913548331
    with pytest.raises(BindingError, match="nonce"):
        TpmVerifier().verify(evidence, report_data=bytes(64), now=GCE_NOW)


def test_keylime_quote_verifies_and_reproduces_expected_values() -> None:
    quote, signature, ak = keylime_parts()
    want = expected("tpm", "tpm/derived_keylime_quote.*")
    claims = verify_quote(
        quote, signature, ak, {"sha256": keylime_pcrs()}, nonce=want["nonce_ascii"].encode()
    )
    assert_matches_expected(claims, want["attest"], {"16": want["pcr16_sha256"]})
    assert load_ak(ak).encoding == "spki"


def test_keylime_quote_with_wrong_nonce_is_a_binding_error() -> None:
    quote, signature, ak = keylime_parts()
    with pytest.raises(BindingError, match="nonce"):
        verify_quote(quote, signature, ak, {"sha256": keylime_pcrs()}, nonce=b"Ai5M5SjYjnkyv4P7itH2")


def test_quote_signed_by_another_ak_is_refused() -> None:
    quote, signature, _ = keylime_parts()
    _, _, trustee_ak, _ = trustee_evidence()
    with pytest.raises(EvidenceError, match="does not verify with the AK"):
        verify_quote(quote, signature, trustee_ak, {"sha256": keylime_pcrs()})


def test_every_flipped_byte_of_a_real_quote_is_refused() -> None:
    quote, signature, ak, pcrs = trustee_evidence()
    key = load_ak(ak)
    nonce = parse_attest(quote).extra_data
    verify_quote(quote, signature, key, {"sha256": pcrs}, nonce=nonce)

    def refused(q: bytes, s: bytes, p: dict[int, bytes]) -> bool:
        try:
            verify_quote(q, s, key, {"sha256": p}, nonce=nonce)
        except AttestationError:
            return True
        return False

    for i in range(len(quote)):
        flipped = bytearray(quote)
        flipped[i] ^= 0x01
        assert refused(bytes(flipped), signature, pcrs), f"quote byte {i}"
    for i in range(len(signature)):
        flipped = bytearray(signature)
        flipped[i] ^= 0x80
        assert refused(quote, bytes(flipped), pcrs), f"signature byte {i}"
    for index, value in pcrs.items():
        for i in range(len(value)):
            flipped = bytearray(value)
            flipped[i] ^= 0x01
            assert refused(quote, signature, {**pcrs, index: bytes(flipped)}), f"PCR {index} byte {i}"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: {**p, 7: b"\x07" * 32}, "pcrDigest"),
        (lambda p: {i: v for i, v in p.items() if i != 7}, "sha256:7 is selected"),
        (lambda p: {**p, 24: bytes(32)}, "does not cover"),
        (lambda p: {**p, 7: bytes(20)}, "20 bytes"),
    ],
    ids=["value-changed", "value-missing", "unquoted-value", "wrong-size"],
)
def test_pcr_value_changes_are_refused(change: Any, reason: str) -> None:
    quote, signature, ak, pcrs = trustee_evidence()
    with pytest.raises(EvidenceError, match=reason):
        verify_quote(quote, signature, ak, {"sha256": change(pcrs)})


def test_real_signatures_parse() -> None:
    gce = gce_attestation()
    assert parse_signature(gce.quotes[0].signature).scheme == "rsassa"
    _, signature, _, _ = trustee_evidence()
    assert len(parse_signature(signature).signature) == 256
