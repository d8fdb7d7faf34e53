"""Intel DCAP (TDX and SGX) verification against the real quotes in ../shared/vectors.

Provenance of every file: ../shared/vectors/MANIFEST.md (dcap-qvl, go-tdx-guest,
trustee, automata). Expected parsed values: ../shared/vectors/expected_values.json
(an independent parser); expected TCB statuses: the table at the end of
MANIFEST.md, with the two deviations documented in ``CASES`` below.

The helpers here (``vector``, ``quote_bytes``, ``collateral_for``) are shared
with the other test_dcap_* modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from enclave.attestation.dcap import decode_quote_text, parse_quote, verify_quote
from enclave.attestation.dcap_pck import INTEL_SGX_ROOT_CA_DER, load_certificate_chain_pem
from enclave.attestation.interface import Evidence
from enclave.attestation.sgx import SgxVerifier
from enclave.attestation.tdx import TdxVerifier
from enclave.errors import BindingError, EvidenceError

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
INTEL = "intel-collateral"


def vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.is_file():
        pytest.fail(f"DCAP test vector {path} is missing: check out ../shared/vectors next to the repo")
    return path.read_bytes()


def quote_bytes(name: str) -> bytes:
    return decode_quote_text(vector(name))


@cache
def expected_values() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(vector("expected_values.json"))
    return {**doc["tdx"], **doc["sgx"]}


def at(day: str) -> datetime:
    return datetime.fromisoformat(f"{day}T12:00:00+00:00")


def _dcapqvl(name: str) -> dict[str, bytes]:
    return {"quote_collateral": vector(name)}


def _pcs(tcb: str, qe: str, pck_crl: str | None = None, root_crl: str | None = None) -> dict[str, bytes]:
    # The PCS issuer chains were HTTP headers upstream; MANIFEST.md supplies the TCB Signing chain.
    signing = vector(f"{INTEL}/derived_intel_sgx_tcb_signing_chain.pem")
    out = {
        "tcb_info": vector(tcb),
        "tcb_info_issuer_chain": signing,
        "qe_identity": vector(qe),
        "qe_identity_issuer_chain": signing,
    }
    if pck_crl is not None:
        out["pck_crl"] = vector(pck_crl)
    if root_crl == "dcap-qvl":
        # Any Intel Root CA CRL verifies; this one (2025-03 .. 2026-04) is fresh in late 2025.
        out["root_ca_crl"] = json.loads(vector("tdx/dcapqvl_tdx_quote_collateral.json"))[
            "root_ca_crl"
        ].encode()
    elif root_crl is not None:
        out["root_ca_crl"] = vector(root_crl)
    return out


@dataclass(frozen=True)
class Case:
    quote: str
    collateral: str  # key into COLLATERAL
    now: str
    status: str | None  # None: refused as "no matching TCB level"
    tcb_date: str | None = None
    advisories: tuple[str, ...] = ()
    # 2023 collateral is signed by the 2025 re-issue of the TCB Signing certificate (the
    # only one in the vectors), so no instant has both valid: these run with expired
    # collateral accepted (a warning), the way an offline replay must.
    expired: bool = False


_GOTDX_2023 = "gotdx-2023"
_GOTDX_V5 = "gotdx-v5"
_AUTOMATA_1025 = "automata-1025"


def collateral_for(key: str) -> dict[str, bytes]:
    if key == "dcapqvl-tdx":
        return _dcapqvl("tdx/dcapqvl_tdx_quote_collateral.json")
    if key == "dcapqvl-tdx-outdated":
        return _dcapqvl("tdx/dcapqvl_tdx_quote_outdated_collateral.json")
    if key == "dcapqvl-sgx":
        return _dcapqvl("sgx/dcapqvl_sgx_quote_collateral.json")
    if key == _GOTDX_2023:
        return _pcs(
            f"{INTEL}/gotdx_sample_tcbInfo_response",
            f"{INTEL}/gotdx_sample_qeIdentity_response",
            f"{INTEL}/gotdx_pckcrl",
            f"{INTEL}/gotdx_rootcrl.der",
        )
    if key == _GOTDX_V5:
        return _pcs(
            f"{INTEL}/gotdx_sample_tcbinfo_response_v5",
            f"{INTEL}/gotdx_sample_qeIdentity_response",
            f"{INTEL}/gotdx_pckcrl",
            f"{INTEL}/gotdx_rootcrl.der",
        )
    if key == _AUTOMATA_1025:
        return _pcs(
            f"{INTEL}/automata_1025_tcb_info.json",
            f"{INTEL}/automata_1025_identity.json",
            f"{INTEL}/automata_1025_pck_crl.der",
            "dcap-qvl",
        )
    if key == "trustee":
        return _pcs("tdx/trustee_tcbInfo.json", "tdx/trustee_enclaveIdentity.json")
    assert key == "none"
    return {}


CASES = [
    Case("tdx/dcapqvl_tdx_quote.bin", "dcapqvl-tdx", "2025-06-20", "UpToDate", "2024-03-13T00:00:00Z"),
    Case("tdx/dcapqvl_tdx-quote.hex", "dcapqvl-tdx", "2025-06-20", None),
    Case("tdx/dcapqvl_quote-from-tappd.hex", "dcapqvl-tdx", "2025-06-20", None),
    Case("tdx/dcapqvl_tdx_quote_outdated.bin", "dcapqvl-tdx-outdated", "2026-02-19", None),
    Case("tdx/gotdx_tdx_prod_quote_SPR_E4.dat", _GOTDX_2023, "2025-06-20", None, expired=True),
    Case(
        "tdx/gotdx_quote_v5_sample.dat",
        _GOTDX_V5,
        "2026-02-02",
        "UpToDate",
        "2024-11-13T00:00:00Z",
        expired=True,
    ),
    Case(
        "tdx/trustee_tdx_quote_4.dat",
        _GOTDX_2023,
        "2025-06-20",
        "UpToDate",
        "2023-02-15T00:00:00Z",
        expired=True,
    ),
    Case("tdx/trustee_tdx_quote_5.dat", _GOTDX_V5, "2026-02-02", None, expired=True),
    Case("tdx/trustee_tdx_quote_6.dat", "trustee", "2025-10-29", "OutOfDate", "2018-01-04T00:00:00Z"),
    # Deviation from MANIFEST.md's simplified reference (which compares all 16 TEE_TCB_SVN
    # bytes and gives OutOfDate 2023-08-09): Intel's QVL (TcbLevelCheck.cpp,
    # isTdxTcbHigherOrEqual) skips components 0 and 1 when TEE_TCB_SVN[1] (module major
    # version) is not 0, leaving the module SVN to the TDX_01 module identity (SVN 4 >= 4:
    # UpToDate). TEE_TCB_SVN here is 04 01 07.
    Case(
        "tdx/gotdx_ccel_cos-113-tdx-quote.dat",
        _AUTOMATA_1025,
        "2025-10-20",
        "UpToDate",
        "2024-03-13T00:00:00Z",
    ),
    # Same rule (TEE_TCB_SVN 02 01 06): the reference says no level matches; Intel's skips
    # the module bytes and lands on the OutOfDate 2023-08-09 level (module TDX_01 SVN 2:
    # OutOfDate too).
    Case(
        "az-vtpm/trustee_az-tdx-vtpm_td-quote.bin",
        _AUTOMATA_1025,
        "2025-10-20",
        "OutOfDate",
        "2023-08-09T00:00:00Z",
        ("INTEL-SA-00960", "INTEL-SA-00982", "INTEL-SA-00986"),
    ),
    Case(
        "sgx/dcapqvl_sgx_quote.bin",
        "dcapqvl-sgx",
        "2025-06-20",
        "ConfigurationAndSWHardeningNeeded",
        "2024-03-13T00:00:00Z",
        ("INTEL-SA-00289", "INTEL-SA-00615"),
    ),
    Case(
        "sgx/automata_solana_quote_sgx.bin",
        "dcapqvl-sgx",
        "2025-06-20",
        "ConfigurationAndSWHardeningNeeded",
        "2024-03-13T00:00:00Z",
        ("INTEL-SA-00289", "INTEL-SA-00615"),
    ),
]
VERIFIED = [c for c in CASES if c.status is not None]
NO_MATCH = [c for c in CASES if c.status is None]
ALL_QUOTES = sorted([c.quote for c in CASES] + ["sgx/trustee_occlum_quote.dat"])


def _ids(cases: list[Case]) -> list[str]:
    return [Path(c.quote).name for c in cases]


@pytest.mark.parametrize("name", ALL_QUOTES)
def test_parsed_values_equal_the_reference_parser(name: str) -> None:
    expected = expected_values()[name]
    quote = parse_quote(quote_bytes(name))
    assert quote.format_name == expected["format"]
    assert quote.size == expected["quote_bytes_used"]
    assert quote.trailing_bytes == expected["trailing_bytes"]
    for field, value in expected["header"].items():
        actual = getattr(quote.header, field)
        assert (actual.hex() if isinstance(actual, bytes) else actual) == value, field
    for field, value in expected["body"].items():
        actual = getattr(quote.body, field)
        assert (actual.hex() if isinstance(actual, bytes) else actual) == value, field
    assert quote.attestation_key.hex() == expected["attestation_key_xy"]
    assert quote.qe_report.isvsvn == expected["qe_isvsvn"]
    assert quote.qe_report.mrenclave.hex() == expected["qe_report_mrenclave"]
    assert quote.qe_report.mrsigner.hex() == expected["qe_report_mrsigner"]


@pytest.mark.parametrize("name", ALL_QUOTES)
def test_signature_chain_verifies_without_collateral(name: str) -> None:
    expected = expected_values()[name]
    result = verify_quote(quote_bytes(name), now=at("2026-03-01"))
    assert result.checks_done == ("pck_chain", "qe_report_signature", "qe_report_binding", "quote_signature")
    assert set(result.checks_not_done) == {"root_ca_crl", "pck_crl", "tcb_info", "qe_identity"}
    assert result.tcb_status is None
    details = result.details()
    for field in ("fmspc", "pceid", "pcesvn", "sgx_tcb_comps", "pck_issuer_cn", "pck_leaf_serial"):
        assert details[field] == expected[field], field
    assert details["pck_leaf_not_before"] == expected["pck_leaf_not_before"]
    assert details["pck_leaf_not_after"] == expected["pck_leaf_not_after"]
    assert details["tcb_status"] is None


@pytest.mark.parametrize("case", VERIFIED, ids=_ids(VERIFIED))
def test_tcb_status_with_collateral(case: Case) -> None:
    result = verify_quote(
        quote_bytes(case.quote),
        now=at(case.now),
        collateral=collateral_for(case.collateral),
        accept_expired_collateral=case.expired,
    )
    assert result.tcb is not None
    assert result.tcb.platform is not None
    assert result.tcb_status == case.status
    assert result.tcb.platform.tcb_date == case.tcb_date
    assert result.tcb.platform.advisory_ids == case.advisories
    assert result.tcb.qe is not None
    assert result.tcb.qe.status == "UpToDate"
    # trustee's collateral has no CRLs; every other case has all four pieces.
    missing = {"root_ca_crl", "pck_crl"} if case.collateral == "trustee" else set()
    assert set(result.checks_not_done) == missing
    assert any("expired" in w for w in result.warnings) == case.expired
    details = result.details()
    assert details["tcb_status"] == case.status
    assert details["platform_tcb"]["advisory_ids"] == list(case.advisories)


@pytest.mark.parametrize("case", NO_MATCH, ids=_ids(NO_MATCH))
def test_no_matching_tcb_level_is_refused_as_such(case: Case) -> None:
    with pytest.raises(EvidenceError, match="no matching TCB level"):
        verify_quote(
            quote_bytes(case.quote),
            now=at(case.now),
            collateral=collateral_for(case.collateral),
            accept_expired_collateral=case.expired,
        )


def test_tdx_module_identity_grades_the_module_of_a_tdx_1_5_quote() -> None:
    result = verify_quote(
        quote_bytes("tdx/gotdx_quote_v5_sample.dat"),
        now=at("2026-02-02"),
        collateral=collateral_for(_GOTDX_V5),
        accept_expired_collateral=True,
    )
    assert result.tcb is not None
    assert result.tcb.tdx_module is not None
    assert result.tcb.tdx_module.status == "UpToDate"  # TDX_01, module SVN 0x0b >= 6
    assert "tdx_module_identity" in result.checks_done


def test_az_quote_module_out_of_date_is_reported() -> None:
    result = verify_quote(
        quote_bytes("az-vtpm/trustee_az-tdx-vtpm_td-quote.bin"),
        now=at("2025-10-20"),
        collateral=collateral_for(_AUTOMATA_1025),
    )
    assert result.tcb is not None
    assert result.tcb.tdx_module is not None
    assert result.tcb.tdx_module.status == "OutOfDate"


def test_expired_collateral_is_refused_by_default() -> None:
    with pytest.raises(EvidenceError, match="expired"):
        verify_quote(
            quote_bytes("tdx/trustee_tdx_quote_4.dat"),
            now=at("2025-06-20"),
            collateral=collateral_for(_GOTDX_2023),
        )


def test_separate_pieces_equal_the_combined_dcap_qvl_collateral() -> None:
    combined = json.loads(vector("tdx/dcapqvl_tdx_quote_collateral.json"))
    pieces = {
        "tcb_info": b'{"tcbInfo":'
        + combined["tcb_info"].encode()
        + b',"signature":"'
        + combined["tcb_info_signature"].encode()
        + b'"}',
        "tcb_info_issuer_chain": combined["tcb_info_issuer_chain"].encode(),
        "qe_identity": b'{ "signature" : "'
        + combined["qe_identity_signature"].encode()
        + b'",\n "enclaveIdentity": '
        + combined["qe_identity"].encode()
        + b"}\n",
        "qe_identity_issuer_chain": combined["qe_identity_issuer_chain"].encode(),
        "root_ca_crl": bytes.fromhex(combined["root_ca_crl"]),
        "pck_crl": combined["pck_crl"].encode(),  # hex is accepted too
        "pck_crl_issuer_chain": combined["pck_crl_issuer_chain"].encode(),
    }
    quote = quote_bytes("tdx/dcapqvl_tdx_quote.bin")
    separate = verify_quote(quote, now=at("2025-06-20"), collateral=pieces)
    together = verify_quote(quote, now=at("2025-06-20"), collateral=collateral_for("dcapqvl-tdx"))
    assert separate.details() == together.details()
    assert separate.checks_done == together.checks_done


def test_tdx_verifier_claims() -> None:
    name = "tdx/dcapqvl_tdx_quote.bin"
    raw = vector(name)
    expected = expected_values()[name]["body"]
    claims = TdxVerifier().verify(
        Evidence(platform="tdx", parts={"quote": raw}),
        report_data=bytes.fromhex(expected["reportdata"]),
        now=at("2025-06-20"),
        collateral=collateral_for("dcapqvl-tdx"),
    )
    assert claims.platform == "tdx"
    assert not claims.simulated
    # RTMR3 of this TD was extended, so the measurement log must replay to it.
    expected_log_register = "rtmr3" if any(bytes.fromhex(expected["rtmr3"])) else None
    assert (claims.log_register, claims.log_hash) == (expected_log_register, "sha384")
    for reg in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrseam", "mrconfigid", "xfam", "td_attributes"):
        assert claims.registers[reg].hex() == expected[reg]
    assert "mrservicetd" not in claims.registers  # a TDX 1.0 body
    assert claims.details["tcb_status"] == "UpToDate"
    assert claims.details["debug"] is False
    assert "report_data" in claims.details["checks_done"]
    assert claims.details["body"]["mrtd"] == expected["mrtd"]


def test_tdx_1_5_registers_include_mrservicetd() -> None:
    name = "tdx/dcapqvl_tdx_quote_outdated.bin"
    expected = expected_values()[name]["body"]
    claims = TdxVerifier().verify(
        Evidence(platform="tdx", parts={"quote": vector(name)}),
        report_data=bytes.fromhex(expected["reportdata"]),
        now=at("2026-02-19"),
    )
    assert claims.registers["mrservicetd"].hex() == expected["mrservicetd"]
    assert claims.registers["tee_tcb_svn2"].hex() == expected["tee_tcb_svn2"]
    assert claims.details["checks_not_done"].keys() == {"root_ca_crl", "pck_crl", "tcb_info", "qe_identity"}


def test_sgx_verifier_claims() -> None:
    name = "sgx/dcapqvl_sgx_quote.bin"
    expected = expected_values()[name]["body"]
    claims = SgxVerifier().verify(
        Evidence(platform="sgx", parts={"quote": vector(name)}),
        report_data=bytes.fromhex(expected["reportdata"]),
        now=at("2025-06-20"),
        collateral=collateral_for("dcapqvl-sgx"),
    )
    assert claims.registers["mrenclave"].hex() == expected["mrenclave"]
    assert claims.registers["mrsigner"].hex() == expected["mrsigner"]
    assert claims.registers["attributes"].hex() == expected["attributes"]
    assert claims.log_register is None  # SGX binds the log through the report data alone
    assert claims.details["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert claims.details["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]


def test_verifier_refuses_other_report_data() -> None:
    name = "sgx/dcapqvl_sgx_quote.bin"
    with pytest.raises(BindingError):
        SgxVerifier().verify(
            Evidence(platform="sgx", parts={"quote": vector(name)}),
            report_data=bytes(64),
            now=at("2025-06-20"),
        )


def test_debug_sgx_enclave_is_refused_unless_allowed() -> None:
    name = "sgx/trustee_occlum_quote.dat"  # ATTRIBUTES 0x07: INIT | DEBUG | MODE64BIT
    raw = vector(name)
    evidence = Evidence(platform="sgx", parts={"quote": raw})
    report_data = parse_quote(raw).report_data
    with pytest.raises(EvidenceError, match="DEBUG enclave"):
        SgxVerifier().verify(evidence, report_data=report_data, now=at("2025-06-20"))
    claims = SgxVerifier(allow_debug=True).verify(evidence, report_data=report_data, now=at("2025-06-20"))
    assert claims.details["debug"] is True
    assert claims.registers["mrenclave"].hex() == expected_values()[name]["body"]["mrenclave"]


def test_verifier_policy_can_refuse_a_tcb_status() -> None:
    name = "tdx/trustee_tdx_quote_6.dat"
    verifier = TdxVerifier(accepted_tcb_statuses=["UpToDate", "SWHardeningNeeded"])
    evidence = Evidence(platform="tdx", parts={"quote": vector(name)})
    report_data = parse_quote(vector(name)).report_data
    with pytest.raises(EvidenceError, match="TCB status OutOfDate is not accepted"):
        verifier.verify(
            evidence, report_data=report_data, now=at("2025-10-29"), collateral=collateral_for("trustee")
        )


def test_debug_td_is_a_claim_and_refused_unless_allowed() -> None:
    name = "tdx/trustee_tdx_quote_4.dat"  # TD_ATTRIBUTES bit 0 set
    raw = vector(name)
    report_data = parse_quote(raw).report_data
    evidence = Evidence(platform="tdx", parts={"quote": raw})
    result = verify_quote(raw, now=at("2025-06-20"))
    assert result.details()["debug"] is True
    assert any("DEBUG" in w for w in result.warnings)
    with pytest.raises(EvidenceError, match="DEBUG TD"):
        TdxVerifier().verify(evidence, report_data=report_data, now=at("2025-06-20"))
    claims = TdxVerifier(allow_debug=True).verify(evidence, report_data=report_data, now=at("2025-06-20"))
    assert claims.details["debug"] is True
    assert claims.registers["td_attributes"][0] & 1


def test_evidence_of_the_wrong_platform_or_tee_is_refused() -> None:
    tdx_quote = vector("tdx/dcapqvl_tdx_quote.bin")
    with pytest.raises(EvidenceError, match="expected tdx evidence"):
        TdxVerifier().verify(
            Evidence("sgx", {"quote": tdx_quote}), report_data=bytes(64), now=at("2025-06-20")
        )
    with pytest.raises(EvidenceError, match="holds a TDX quote"):
        SgxVerifier().verify(
            Evidence("sgx", {"quote": tdx_quote}), report_data=bytes(64), now=at("2025-06-20")
        )
    with pytest.raises(EvidenceError, match="lacks its 'quote' part"):
        TdxVerifier().verify(Evidence("tdx", {}), report_data=bytes(64), now=at("2025-06-20"))


def test_pinned_root_is_the_root_in_every_quote_and_in_the_vectors() -> None:
    assert vector(f"{INTEL}/dcapqvl_TrustedRootCA.der") == INTEL_SGX_ROOT_CA_DER
    (pem_root,) = load_certificate_chain_pem(vector(f"{INTEL}/gotdx_trusted_root.pem"), "root")
    assert pem_root.tbs_certificate_bytes in INTEL_SGX_ROOT_CA_DER
    for name in ALL_QUOTES:
        chain = load_certificate_chain_pem(parse_quote(quote_bytes(name)).pck_chain_pem, name)
        assert chain[-1] == pem_root


@pytest.mark.parametrize(
    "name",
    [
        "tdx/gotdx_report.dat",
        "sev-snp/gosev_attestation.bin",
        "tdx/gotdx_ccel_table.dat",
        "tdx/gotdx_ccel_nonce.dat",
    ],
)
def test_files_that_are_not_quotes_are_refused(name: str) -> None:
    with pytest.raises(EvidenceError):
        verify_quote(decode_quote_text(vector(name)), now=at("2025-06-20"))


def test_naive_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_quote(vector("tdx/dcapqvl_tdx_quote.bin"), now=datetime(2025, 6, 20))


def test_expected_values_cover_every_quote() -> None:
    assert set(expected_values()) == set(ALL_QUOTES)
