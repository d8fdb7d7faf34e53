"""Policy for the hardware platforms: TPM AK trust, DCAP TCB status, debug mode; their manifest fields."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from custodian.authority import CertificateAuthority
from enclave.attestation import AttestedClaims, PlatformClaims, ReferenceValues, policy
from enclave.attestation.dcap import DcapVerifier
from enclave.attestation.platforms import manifest_verifier
from enclave.attestation.tpm import TpmVerifier
from enclave.errors import ManifestError, PolicyError
from tests.unit.enclave._sim_evidence import pinned_registers


def _reference(platform: str, **changes: Any) -> ReferenceValues:
    return ReferenceValues(
        platform=platform,
        allow_simulation=platform == "sim",
        custodian_ca_sha256="00" * 32,
        code_sha384="00" * 48,
        **{"registers": pinned_registers(platform), **changes},
    )


def _mismatches(platform: str, details: dict[str, Any], reference: ReferenceValues, **options: Any) -> str:
    claims = AttestedClaims(
        nonce=bytes(32), public_key=b"k", deployment="d", platform=platform, purpose="attest", log=()
    )
    evidence = PlatformClaims(
        platform=platform,
        report_data=bytes(64),
        registers={},
        simulated=False,
        log_register=None,
        log_hash="sha384",
        details=details,
    )
    # The empty log always misses the code and config events; the platform checks are what is asserted.
    with pytest.raises(PolicyError) as caught:
        policy.check(claims, evidence, reference, require_model=False, **options)
    return str(caught.value)


@pytest.mark.parametrize(
    ("trust", "options", "refused"),
    [
        pytest.param("none", {}, True, id="no-ak-certificate"),
        pytest.param("certificate", {}, False, id="ak-certificate"),
        pytest.param("none", {"ak_trust_by_credential": True}, False, id="custodian-credential-round"),
    ],
)
def test_tpm_evidence_needs_established_ak_trust(trust: str, options: dict[str, Any], refused: bool) -> None:
    text = _mismatches("tpm", {"ak_trust": trust}, _reference("tpm"), **options)
    assert ("attestation key trust" in text) is refused


@pytest.mark.parametrize(
    ("platform", "details", "changes", "expected"),
    [
        pytest.param("tdx", {"tcb_status": "UpToDate", "debug": False}, {}, None, id="tdx-up-to-date"),
        pytest.param(
            "tdx",
            {"tcb_status": "OutOfDate", "debug": False},
            {},
            "TCB status is OutOfDate",
            id="tdx-out-of-date",
        ),
        pytest.param(
            "sgx",
            {"tcb_status": "OutOfDate", "debug": False},
            {"accepted_tcb_statuses": ("UpToDate", "OutOfDate")},
            None,
            id="sgx-accepted-status",
        ),
        pytest.param("tdx", {"tcb_status": None, "debug": False}, {}, "not evaluated", id="tdx-no-tcb-info"),
        pytest.param("tdx", {"tcb_status": "UpToDate", "debug": True}, {}, "debug", id="tdx-debug"),
        pytest.param(
            "tdx",
            {"tcb_status": "UpToDate", "debug": True},
            {"allow_debug": True},
            None,
            id="tdx-debug-allowed",
        ),
        pytest.param("sev-snp", {"policy": {"debug": True}}, {}, "debug", id="snp-debug"),
        pytest.param("sev-snp", {"policy": {"debug": False}}, {}, None, id="snp-no-debug"),
        pytest.param("sev-snp", {}, {}, "debug", id="snp-debug-unknown"),
    ],
)
def test_tee_tcb_status_and_debug(
    platform: str, details: dict[str, Any], changes: dict[str, Any], expected: str | None
) -> None:
    text = _mismatches(platform, details, _reference(platform, **changes))
    if expected is None:
        assert "TCB status" not in text
        assert "debug" not in text
    else:
        assert expected in text


@pytest.mark.parametrize("platform", ["tdx", "sev-snp", "sgx", "tpm", "sim"])
def test_platform_manifest_fields_round_trip(platform: str) -> None:
    # Every field that applies to the platform, away from its default; the others stay default.
    fields: dict[str, Any] = {}
    if platform in ("tdx", "sgx"):
        fields["accepted_tcb_statuses"] = ("UpToDate", "SWHardeningNeeded")
    if platform in ("tdx", "sgx", "sev-snp"):
        fields["allow_debug"] = True
    if platform == "tpm":
        fields["tpm_app_pcr"] = 14
    reference = _reference(platform, **fields)
    assert ReferenceValues.from_toml(reference.to_toml()) == reference


@pytest.mark.parametrize(
    ("top", "tpm", "match"),
    [
        pytest.param("", "app_pcr = 99", "app_pcr", id="pcr-out-of-range"),
        pytest.param("", 'ek_roots = "not pem"', "ek_roots", id="ek-roots-not-pem"),
        pytest.param('allow_debug = "yes"', "", "allow_debug", id="allow-debug-not-bool"),
        pytest.param("accepted_tcb_statuses = [1]", "", "accepted_tcb_statuses", id="statuses-not-names"),
    ],
)
def test_bad_platform_manifest_fields_are_refused(top: str, tpm: str, match: str) -> None:
    text = (
        _reference("tpm").to_toml().replace("app_pcr = 15", tpm).replace("[registers]", f"{top}\n[registers]")
    )
    with pytest.raises(ManifestError, match=match):
        ReferenceValues.from_toml(text)


def test_a_tpm_table_on_another_platform_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"\[tpm\]"):
        ReferenceValues.from_toml(_reference("sim").to_toml() + "\n[tpm]\napp_pcr = 15\n")


_SNP_OK = {
    "policy": {"debug": False, "migrate_ma": False},
    "reported_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
}


@pytest.mark.parametrize(
    ("details", "changes", "expected"),
    [
        pytest.param(_SNP_OK, {"snp_min_tcb": {"snp": 8, "microcode": 115}}, None, id="tcb-at-minimum"),
        pytest.param(_SNP_OK, {"snp_min_tcb": {"microcode": 200}}, "microcode is 115", id="old-microcode"),
        pytest.param(
            {**_SNP_OK, "reported_tcb": {}}, {"snp_min_tcb": {"snp": 1}}, "no snp component", id="tcb-missing"
        ),
        pytest.param(
            {**_SNP_OK, "policy": {"debug": False, "migrate_ma": True}},
            {},
            "migration agent",
            id="migration-agent",
        ),
        pytest.param(
            {**_SNP_OK, "policy": {"debug": False, "migrate_ma": True}},
            {"snp_allow_migration_agent": True},
            None,
            id="migration-agent-allowed",
        ),
    ],
)
def test_snp_minimum_tcb_and_guest_policy(
    details: dict[str, Any], changes: dict[str, Any], expected: str | None
) -> None:
    text = _mismatches("sev-snp", details, _reference("sev-snp", **changes))
    if expected is None:
        assert "REPORTED_TCB" not in text
        assert "migration" not in text
    else:
        assert expected in text


def test_snp_manifest_table_round_trips_and_is_checked() -> None:
    reference = _reference(
        "sev-snp", snp_min_tcb={"snp": 8, "microcode": 115}, snp_allow_migration_agent=True
    )
    assert ReferenceValues.from_toml(reference.to_toml()) == reference
    with pytest.raises(ManifestError, match="min_tcb"):
        ReferenceValues.from_toml(reference.to_toml().replace("microcode = 115", "microcode = 999"))
    with pytest.raises(ManifestError, match=r"\[sev_snp\] table"):
        ReferenceValues.from_toml(_reference("tdx").to_toml() + "\n[sev_snp]\nallow_migration_agent = true\n")


@pytest.mark.parametrize(
    ("platform", "registers", "missing"),
    [
        ("tdx", {}, "mrtd, rtmr0, rtmr1, rtmr2"),
        ("tdx", {"mrtd": "00" * 48, "rtmr0": "00" * 48, "rtmr1": "00" * 48}, "missing: rtmr2"),
        ("sgx", {"attributes": "00" * 16}, "mrenclave or mrsigner"),
        ("sev-snp", {"host_data": "00" * 32}, "missing: measurement"),
    ],
)
def test_a_hardware_manifest_must_pin_the_build(
    platform: str, registers: dict[str, str], missing: str
) -> None:
    with pytest.raises(ManifestError, match=missing):
        _reference(platform, registers=registers)
    pinned = _reference(platform).to_toml()
    unpinned = (
        pinned[: pinned.index("[registers]")]
        + "[registers]\n"
        + "".join(f'"{name}" = "{value}"\n' for name, value in registers.items())
    )
    with pytest.raises(ManifestError, match=missing):
        ReferenceValues.from_toml(unpinned)


def test_an_sgx_manifest_may_pin_the_signer_alone() -> None:
    assert _reference("sgx", registers={"mrsigner": "00" * 32}).registers == {"mrsigner": "00" * 32}


@pytest.mark.parametrize("platform", ["tdx", "sgx"])
@pytest.mark.parametrize("allow_debug", [False, True])
def test_appraisal_verifies_with_the_manifests_debug_setting(platform: str, allow_debug: bool) -> None:
    # The verifier refuses a debug quote itself: with its default, allow_debug = true did nothing.
    verifier = manifest_verifier(_reference(platform, allow_debug=allow_debug))
    assert isinstance(verifier, DcapVerifier)
    assert verifier.allow_debug is allow_debug


def test_appraisal_verifies_tpm_evidence_with_the_manifests_pcr_and_ak_roots(tmp_path: Path) -> None:
    root = CertificateAuthority.load_or_create(
        tmp_path, "ak-root", "AK root", now=datetime.datetime.now(datetime.UTC)
    )
    reference = _reference("tpm", tpm_app_pcr=14, tpm_ak_roots=root.pem.decode())
    verifier = manifest_verifier(reference)
    assert isinstance(verifier, TpmVerifier)
    assert (verifier.app_pcr, verifier._ak_roots) == (14, (root.certificate,))
    trusting = manifest_verifier(reference, trust_ak=True)
    assert isinstance(trusting, TpmVerifier)
    assert trusting._ak_roots == ()
