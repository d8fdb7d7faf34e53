"""Software quotes through verify_quote and TpmVerifier: schemes, AK encodings, claims, refusals.

The measurement log is replayed through the real ``appraise`` into the
application PCR of a quote made by the software TPM of test_tpm_marshal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclave.attestation import (
    AttestedClaims,
    MeasurementEvent,
    ReferenceValues,
    appraise,
)
from enclave.attestation.claims import replay
from enclave.attestation.interface import Evidence
from enclave.attestation.measurement import config_event, custodian_ca_sha256
from enclave.attestation.tpm import TpmVerifier, parse_pcr_values, qualifying_data, verify_quote
from enclave.attestation.tpm_structures import parse_attest
from enclave.errors import BindingError, EvidenceError

from .test_tpm_marshal import (
    AK_ENCODINGS,
    ECDSA,
    NOW,
    REPORT_DATA,
    RSASSA,
    SCHEMES,
    SELECTION,
    PrivateKey,
    SoftwareTpm,
    marshal_public,
    pcr_json,
    replace_parts,
    software_keys,
    spki,
    tpm_for,
    without,
)


@pytest.mark.parametrize("encoding", list(AK_ENCODINGS))
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_software_quote_verifies(scheme: str, encoding: str) -> None:
    tpm = tpm_for(scheme)
    nonce = hashlib.sha512(b"claims").digest()
    message, signature = tpm.quote(nonce, SELECTION)
    claims = verify_quote(message, signature, AK_ENCODINGS[encoding](tpm), tpm.values(SELECTION), nonce=nonce)
    assert claims.nonce == nonce
    assert claims.pcrs["sha384"][0] == tpm.banks["sha384"][0]
    assert list(claims.pcrs["sha256"]) == list(range(24))
    assert claims.to_dict()["signature_scheme"] == scheme.replace("-p256", "").replace("-p384", "")


def test_pcr_digest_follows_selection_order_and_signature_hash() -> None:
    tpm = tpm_for("rsassa-sha384")
    selection = [("sha384", [15, 0]), ("sha256", [3])]
    message, signature = tpm.quote(b"n", selection)
    expected = hashlib.sha384(
        tpm.banks["sha384"][0] + tpm.banks["sha384"][15] + tpm.banks["sha256"][3]
    ).digest()
    assert parse_attest(message).pcr_digest == expected
    verify_quote(message, signature, tpm.ak(), tpm.values(selection))


def test_tpm_verifier_claims() -> None:
    tpm = tpm_for()
    report_data = hashlib.sha512(b"claims").digest()
    claims = TpmVerifier().verify(tpm.evidence(report_data, SELECTION), report_data=report_data, now=NOW)
    assert claims.platform == "tpm"
    assert not claims.simulated
    assert claims.report_data == report_data
    assert claims.log_register == "pcr.sha384.15"
    assert claims.log_hash == "sha384"
    assert claims.registers["pcr.sha256.0"] == tpm.banks["sha256"][0]
    assert claims.registers["pcr.sha384.7"] == bytes(48)
    assert len(claims.registers) == 27
    details = claims.details
    assert (details["clock"], details["reset_count"], details["restart_count"]) == (987654321, 4, 1)
    assert details["safe"] is True
    assert details["firmware_version"] == "0x2024010100010002"
    assert details["qualified_signer"] == "000b" + "00" * 32
    assert details["extra_data"] == qualifying_data(report_data).hex()
    assert details["ak_trust"] == "none"
    assert details["ak_encoding"] == "tpmt_public"


def test_log_register_falls_back_to_sha256_and_follows_app_pcr() -> None:
    tpm = tpm_for()
    report_data = bytes(range(64))
    only_sha256 = tpm.evidence(report_data, [("sha256", [0, 15])])
    claims = TpmVerifier().verify(only_sha256, report_data=report_data, now=NOW)
    assert (claims.log_register, claims.log_hash) == ("pcr.sha256.15", "sha256")
    other_pcr = tpm.evidence(report_data, [("sha256", [23]), ("sha384", [23])])
    claims = TpmVerifier(app_pcr=23).verify(other_pcr, report_data=report_data, now=NOW)
    assert (claims.log_register, claims.log_hash) == ("pcr.sha384.23", "sha384")
    with pytest.raises(ValueError, match="out of range"):
        TpmVerifier(app_pcr=64)
    without_app_pcr = tpm.evidence(report_data, [("sha256", [0, 14]), ("sha384", [16])])
    with pytest.raises(EvidenceError, match="application PCR 15"):
        TpmVerifier().verify(without_app_pcr, report_data=report_data, now=NOW)


# --- the measurement log, replayed through appraise() ---

CA_DER = b"test custodian ca"


def _tpm_claims(log: tuple[MeasurementEvent, ...]) -> AttestedClaims:
    return AttestedClaims(
        nonce=b"\x01" * 32,
        public_key=b"enclave key",
        deployment="demo",
        platform="tpm",
        purpose="enrol",
        log=log,
    )


def _appraise_tpm(evidence: Evidence, claims: AttestedClaims, code: MeasurementEvent) -> None:
    reference = ReferenceValues(
        platform="tpm",
        allow_simulation=False,
        allow_unmeasured_os=True,  # a synthetic quote over PCR 0 alone: the log replay is what is tested
        custodian_ca_sha256=custodian_ca_sha256(CA_DER),
        code_sha384=code.sha384.hex(),
        registers={
            "pcr.sha256.0": hashlib.sha256(bytes(32) + hashlib.sha256(b"firmware").digest()).hexdigest()
        },
    )
    appraise(
        evidence.to_bytes(),
        claims.to_bytes(),
        reference,
        now=NOW,
        nonce=claims.nonce,
        public_key=claims.public_key,
        purpose="enrol",
        deployment="demo",
        tpm_credential=True,  # AK trust is the credential round's question, not this test's
    )


@pytest.mark.parametrize("banks", [["sha256", "sha384"], ["sha256"]])
def test_measurement_log_replays_into_application_pcr(banks: list[str]) -> None:
    tpm = tpm_for("rsapss-sha256")
    code = MeasurementEvent(
        kind="code", sha384=hashlib.sha384(b"enclave code").digest(), detail={"build": "x"}
    )
    log = (code, config_event(CA_DER))
    for event in log:
        for bank in banks:
            tpm.extend(bank, 15, event.digest(bank))
    claims = _tpm_claims(log)
    selection = [(bank, [0, 15]) for bank in banks]
    evidence = tpm.evidence(claims.report_data(), selection)
    claims_seen = TpmVerifier().verify(evidence, report_data=claims.report_data(), now=NOW)
    assert claims_seen.log_register is not None
    assert replay(log, claims_seen.log_hash) == claims_seen.registers[claims_seen.log_register]
    _appraise_tpm(evidence, claims, code)

    # Claims that list an event the application PCR never saw, freshly quoted.
    forged = _tpm_claims((*log, MeasurementEvent(kind="model", sha384=hashlib.sha384(b"m").digest())))
    forged_evidence = tpm.evidence(forged.report_data(), selection)
    with pytest.raises(BindingError, match=f"replay to register pcr.{banks[-1]}.15"):
        _appraise_tpm(forged_evidence, forged, code)
    # The genuine log with evidence quoted for other claims.
    with pytest.raises(BindingError, match="nonce"):
        _appraise_tpm(forged_evidence, claims, code)


# --- refusals through TpmVerifier ---


def _sha1_signed(tpm: SoftwareTpm) -> Evidence:
    sha1 = SoftwareTpm(tpm.key, tpm.scheme, "sha1", tpm.banks)
    message, signature = sha1.quote(REPORT_DATA, SELECTION)
    return replace_parts(
        tpm.evidence(REPORT_DATA, SELECTION), quote=message, signature=signature, ak=spki(tpm.key)
    )


def _changed_pcr(evidence: Evidence) -> Evidence:
    pcrs = parse_pcr_values(evidence.parts["pcrs"])
    pcrs["sha256"][15] = b"\x15" * 32
    return replace_parts(evidence, pcrs=pcr_json(pcrs))


def _flip(data: bytes, index: int) -> bytes:
    flipped = bytearray(data)
    flipped[index] ^= 1
    return bytes(flipped)


Refusal = Callable[[SoftwareTpm, dict[str, PrivateKey], Evidence], Evidence]
REFUSALS: list[tuple[str, Refusal, type[Exception], str]] = [
    (
        "other-platform",
        lambda t, k, e: Evidence(platform="sim", parts=e.parts),
        EvidenceError,
        "expected tpm",
    ),
    ("missing-quote", lambda t, k, e: without(e, "quote"), EvidenceError, "'quote' part"),
    ("missing-pcrs", lambda t, k, e: without(e, "pcrs"), EvidenceError, "'pcrs' part"),
    ("wrong-nonce", lambda t, k, e: t.evidence(bytes(64), SELECTION), BindingError, "nonce"),
    ("pcr-value-changed", lambda t, k, e: _changed_pcr(e), EvidenceError, "pcrDigest"),
    (
        "flipped-quote-byte",
        lambda t, k, e: replace_parts(e, quote=_flip(e.parts["quote"], 40)),
        EvidenceError,
        "AK",
    ),
    (
        "flipped-signature-byte",
        lambda t, k, e: replace_parts(e, signature=_flip(e.parts["signature"], 20)),
        EvidenceError,
        "does not verify",
    ),
    (
        "other-ak",
        lambda t, k, e: replace_parts(e, ak=marshal_public(ec.generate_private_key(ec.SECP256R1()))),
        EvidenceError,
        "does not verify with the AK",
    ),
    ("rsa-ak-for-ecdsa", lambda t, k, e: replace_parts(e, ak=spki(k["rsa"])), EvidenceError, "does not fit"),
    (
        "ak-not-restricted",
        lambda t, k, e: replace_parts(e, ak=marshal_public(t.key, attributes=0x00040072)),
        EvidenceError,
        "missing: restricted",
    ),
    (
        "ak-scheme-differs",
        lambda t, k, e: replace_parts(e, ak=marshal_public(t.key, scheme=ECDSA, scheme_hash="sha384")),
        EvidenceError,
        "not the AK's scheme",
    ),
    ("sha1-signature", lambda t, k, e: _sha1_signed(t), EvidenceError, "not SHA-256"),
    (
        "p521-ak",
        lambda t, k, e: replace_parts(e, ak=spki(ec.generate_private_key(ec.SECP521R1()))),
        EvidenceError,
        "P-256 or P-384",
    ),
]


@pytest.mark.parametrize(("make", "error", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_tpm_verifier_refusals_name_the_reason(make: Refusal, error: type[Exception], reason: str) -> None:
    tpm = tpm_for()
    evidence = make(tpm, software_keys(), tpm.evidence(REPORT_DATA, SELECTION))
    with pytest.raises(error, match=reason):
        TpmVerifier().verify(evidence, report_data=REPORT_DATA, now=NOW)


def test_report_data_must_be_64_bytes() -> None:
    tpm = tpm_for()
    evidence = tpm.evidence(b"short", SELECTION)
    with pytest.raises(BindingError, match="64 bytes"):
        TpmVerifier().verify(evidence, report_data=b"short", now=NOW)


def test_rsa_1024_signature_is_refused_for_its_size() -> None:
    small = rsa.generate_private_key(65537, 1024)
    tpm = SoftwareTpm(small, RSASSA)
    message, signature = tpm.quote(b"n", [("sha256", [0])])
    with pytest.raises(EvidenceError, match="shorter than 2048"):
        verify_quote(message, signature, spki(small), tpm.values([("sha256", [0])]))
