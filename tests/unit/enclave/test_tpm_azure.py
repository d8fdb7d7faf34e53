"""Azure confidential VM vTPM samples from ../shared/vectors/az-vtpm (trustee test data).

HCL report -> runtime JSON (bound by REPORT_DATA[0:32] = sha256) -> HCLAkPub ->
TPM quote. The SNP / TDX hardware report chain is not part of this module.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from enclave.attestation.az_vtpm import complete_hardware_chain, parse_hcl_report, verify_az_vtpm
from enclave.attestation.tpm_structures import parse_attest
from enclave.errors import BindingError, EvidenceError

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
HCL_OFFSET_IGVM = 32 + 1184


def vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.fail(f"test vector {path} is missing: the shared vectors must be checked out next to the repo")
    return path.read_bytes()


def expected(name: str) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(vector("expected_values.json"))["tpm"][name]
    return entry


def quote_v1(kind: str) -> tuple[bytes, bytes, dict[str, dict[int, bytes]]]:
    doc = json.loads(vector(f"az-vtpm/trustee_az-{kind}-vtpm_tpm-quote-v1.json"))
    pcrs = {"sha256": {i: bytes.fromhex(v) for i, v in enumerate(doc["pcrs"])}}
    return bytes.fromhex(doc["message"]), bytes.fromhex(doc["signature"]), pcrs


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def bundle(name: str) -> tuple[bytes, bytes, bytes, dict[str, dict[int, bytes]]]:
    """trustee evidence bundles: v0 as byte arrays, v1/v2 as hex (quote) and base64url (HCL report)."""
    doc = json.loads(vector(f"az-vtpm/{name}"))
    quote = doc.get("quote") or doc["tpm_quote"]
    report = doc.get("report") or doc["hcl_report"]
    if isinstance(report, list):
        pcrs = [bytes(p) for p in quote["pcrs"]]
        return (
            bytes(report),
            bytes(quote["message"]),
            bytes(quote["signature"]),
            {"sha256": dict(enumerate(pcrs))},
        )
    pcrs = [bytes.fromhex(p) for p in quote["pcrs"]]
    return (
        _b64url(report),
        bytes.fromhex(quote["message"]),
        bytes.fromhex(quote["signature"]),
        {"sha256": dict(enumerate(pcrs))},
    )


@pytest.mark.parametrize("kind", ["snp", "tdx"])
def test_azure_quote_verifies_with_hcl_ak_and_reproduces_expected_values(kind: str) -> None:
    name = f"az-vtpm/trustee_az-{kind}-vtpm_tpm-quote-v1.json"
    want = expected(name)
    message, signature, pcrs = quote_v1(kind)
    claims = verify_az_vtpm(
        vector(f"az-vtpm/trustee_az-{kind}-vtpm_hcl-report.bin"),
        message,
        signature,
        pcrs,
        nonce=want["extra_data_ascii"].encode(),
    )
    attest, quoted = claims.quote.attest, claims.quote.pcrs["sha256"]
    assert claims.hcl.report_type == kind
    assert not claims.hardware_report_verified
    assert f"{attest.type:#x}" == want["attest"]["type"]
    assert attest.extra_data.hex() == want["attest"]["extra_data"]
    assert attest.clock_info.clock == want["attest"]["clock"]
    assert attest.clock_info.reset_count == want["attest"]["reset_count"]
    assert attest.clock_info.restart_count == want["attest"]["restart_count"]
    assert f"{attest.firmware_version:#018x}" == want["attest"]["firmware_version"]
    assert attest.pcr_digest.hex() == want["attest"]["pcr_digest"]
    assert [[f"{s.hash_alg:#x}", list(s.pcrs)] for s in attest.pcr_selection] == want["attest"]["pcr_select"]
    assert {str(i): v.hex() for i, v in quoted.items()} == want["pcrs_sha256"]
    assert claims.to_dict()["hardware_report_verified"] is False


def test_snp_hcl_report_data_matches_expected_snp_report() -> None:
    hcl = parse_hcl_report(vector("az-vtpm/trustee_az-snp-vtpm_hcl-report.bin"))
    snp = json.loads(vector("expected_values.json"))["sev-snp"]["az-vtpm/trustee_az-snp-vtpm_hcl-report.bin"]
    assert hcl.report_data.hex() == snp["report_data"]
    assert len(hcl.hardware_report) == 1184
    assert hcl.hardware_report[0x90 : 0x90 + 48].hex() == snp["measurement"]
    assert hashlib.sha256(hcl.runtime_data).digest() == hcl.report_data[:32]
    assert hcl.runtime_claims["vm-configuration"]["secure-boot"] is True
    hcl.check_binding()


def test_tdx_hcl_report_exposes_the_td_report() -> None:
    hcl = parse_hcl_report(vector("az-vtpm/trustee_az-tdx-vtpm_hcl-report.bin"))
    assert hcl.report_type == "tdx"
    assert len(hcl.hardware_report) == 1024
    assert hcl.hardware_report[0] == 0x81  # REPORTTYPE.TYPE = TDX
    assert hcl.report_data[:32] == hashlib.sha256(hcl.runtime_data).digest()
    hcl.check_binding()


@pytest.mark.parametrize(
    ("name", "nonce_size", "kind"),
    [
        ("trustee_az-snp-vtpm_evidence-v0.json", 9, "snp"),
        ("trustee_az-snp-vtpm_evidence-v1.json", 9, "snp"),
        ("trustee_az-snp-vtpm_evidence-v2.json", 48, "snp"),
        ("trustee_az-tdx-vtpm_evidence-v0.json", 9, "tdx"),
        ("trustee_az-tdx-vtpm_evidence-v1.json", 9, "tdx"),
    ],
)
def test_azure_evidence_bundles_verify(name: str, nonce_size: int, kind: str) -> None:
    report, message, signature, pcrs = bundle(name)
    nonce = parse_attest(message).extra_data
    claims = verify_az_vtpm(report, message, signature, pcrs, nonce=nonce)
    assert len(claims.quote.nonce) == nonce_size
    assert claims.hcl.report_type == kind


def test_quote_does_not_verify_with_the_other_vms_hcl_ak() -> None:
    message, signature, pcrs = quote_v1("snp")
    with pytest.raises(EvidenceError, match="does not verify with the AK"):
        verify_az_vtpm(vector("az-vtpm/trustee_az-tdx-vtpm_hcl-report.bin"), message, signature, pcrs)


def test_azure_wrong_nonce_is_a_binding_error() -> None:
    message, signature, pcrs = quote_v1("snp")
    with pytest.raises(BindingError, match="nonce"):
        verify_az_vtpm(
            vector("az-vtpm/trustee_az-snp-vtpm_hcl-report.bin"), message, signature, pcrs, nonce=b"x"
        )


def test_runtime_data_not_matching_report_data_is_a_binding_error() -> None:
    report = bytearray(vector("az-vtpm/trustee_az-snp-vtpm_hcl-report.bin"))
    start = report.index(b'"secure-boot":true')
    report[start : start + len(b'"secure-boot":true')] = b'"secure-boot":null'
    message, signature, pcrs = quote_v1("snp")
    with pytest.raises(BindingError, match="not bound"):
        verify_az_vtpm(bytes(report), message, signature, pcrs)


def test_stray_quote_message_parses_only() -> None:
    # Its AK is not in the upstream repository: parse-only (see MANIFEST.md).
    attest = parse_attest(vector("az-vtpm/trustee_az-snp-vtpm_tpm-quote.msg"))
    assert attest.extra_data == b"challenge"
    hcl = vector("az-vtpm/trustee_az-snp-vtpm_hcl-report.bin")
    message = vector("az-vtpm/trustee_az-snp-vtpm_tpm-quote.msg")
    signature = vector("az-vtpm/trustee_az-snp-vtpm_tpm-quote.sig")
    with pytest.raises(EvidenceError, match="does not verify with the AK"):
        verify_az_vtpm(hcl, message, signature, {"sha256": {}})


def _with_u32(report: bytes, offset: int, value: int) -> bytes:
    return report[:offset] + value.to_bytes(4, "little") + report[offset + 4 :]


HCL_REFUSALS = [
    ("bad-signature", lambda r: b"XCLA" + r[4:], "signature"),
    ("truncated-header", lambda r: r[:100], "fixed part"),
    ("unknown-report-type", lambda r: _with_u32(r, HCL_OFFSET_IGVM + 8, 3), "report_type"),
    ("unknown-hash-type", lambda r: _with_u32(r, HCL_OFFSET_IGVM + 12, 9), "hash_type"),
    ("variable-data-overrun", lambda r: _with_u32(r, HCL_OFFSET_IGVM + 16, 5000), "variable_data_size"),
    ("variable-data-cut", lambda r: _with_u32(r, HCL_OFFSET_IGVM + 16, 100), "not JSON"),
    ("oversized", lambda r: r + bytes(20000), "limit"),
]


@pytest.mark.parametrize(
    ("mutate", "reason"), [r[1:] for r in HCL_REFUSALS], ids=[r[0] for r in HCL_REFUSALS]
)
def test_malformed_hcl_reports_are_refused(mutate: Any, reason: str) -> None:
    report = vector("az-vtpm/trustee_az-snp-vtpm_hcl-report.bin")
    with pytest.raises(EvidenceError, match=reason):
        parse_hcl_report(mutate(report))


def test_runtime_data_without_ak_is_refused() -> None:
    hcl = parse_hcl_report(vector("az-vtpm/trustee_az-snp-vtpm_hcl-report.bin"))
    keys = [k for k in hcl.runtime_claims["keys"] if k["kid"] != "HCLAkPub"]
    with pytest.raises(EvidenceError, match="0 HCLAkPub"):
        replace(hcl, runtime_claims={**hcl.runtime_claims, "keys": keys}).ak()


def _azure_quote_claims(kind: str) -> Any:
    message, signature, pcrs = quote_v1(kind)
    nonce = expected(f"az-vtpm/trustee_az-{kind}-vtpm_tpm-quote-v1.json")["extra_data_ascii"].encode()
    return verify_az_vtpm(
        vector(f"az-vtpm/trustee_az-{kind}-vtpm_hcl-report.bin"), message, signature, pcrs, nonce=nonce
    )


def test_snp_hcl_report_is_anchored_to_the_amd_root() -> None:
    claims = _azure_quote_claims("snp")
    assert not claims.hardware_report_verified
    at = datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC)
    vcek = vector("az-vtpm/trustee_az-snp-vtpm_vcek.pem")
    assert complete_hardware_chain(claims, now=at, snp_vcek=vcek).hardware_report_verified
    # A genuine Milan VCEK with its chain, but for another chip: the binding, not the chain, refuses it.
    with pytest.raises(EvidenceError, match="CHIP_ID"):
        complete_hardware_chain(
            claims,
            now=at,
            snp_vcek=vector("sev-snp/trustee_test-vcek.der"),
            snp_chain=vector("sev-snp/trustee_milan_ask_ark_asvk.pem"),
        )


def test_tdx_hcl_report_is_anchored_through_the_td_quote() -> None:
    claims = _azure_quote_claims("tdx")
    at = datetime.datetime(2024, 6, 1, tzinfo=datetime.UTC)
    td_quote = vector("az-vtpm/trustee_az-tdx-vtpm_td-quote.bin")
    assert complete_hardware_chain(claims, now=at, td_quote=td_quote).hardware_report_verified
    other = vector("tdx/dcapqvl_tdx_quote.bin")
    with pytest.raises(BindingError, match="REPORT_DATA"):
        complete_hardware_chain(
            claims, now=datetime.datetime(2025, 7, 1, tzinfo=datetime.UTC), td_quote=other
        )
