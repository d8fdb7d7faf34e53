"""Manifests that no evidence can satisfy, and tpm manifests that leave the OS unmeasured, are refused."""

from __future__ import annotations

from typing import Any

import pytest

from enclave.attestation import ReferenceValues
from enclave.attestation.manifest import UNMEASURED_OS_WARNING
from enclave.attestation.register_layout import OS_PCR_SETS
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.errors import ManifestError

from ._sim_evidence import pinned_registers

CLASSIC = {f"pcr.sha256.{i}": "11" * 32 for i in OS_PCR_SETS["classic"]}
UKI = {f"pcr.sha384.{i}": "22" * 48 for i in OS_PCR_SETS["uki"]}


def _manifest(platform: str, **changes: Any) -> ReferenceValues:
    fields: dict[str, Any] = {
        "platform": platform,
        "allow_simulation": platform == "sim",
        "custodian_ca_sha256": "00" * 32,
        "code_sha384": "00" * 48,
        "registers": CLASSIC if platform == "tpm" else pinned_registers(platform),
    }
    return ReferenceValues(**{**fields, **changes})


@pytest.mark.parametrize("registers", [CLASSIC, UKI, {**CLASSIC, **UKI}], ids=["classic", "uki", "both"])
def test_a_tpm_manifest_pinning_a_boot_chain_set_round_trips(registers: dict[str, str]) -> None:
    manifest = _manifest("tpm", registers=registers)
    assert ReferenceValues.from_toml(manifest.to_toml()) == manifest
    assert manifest.warnings == ()


UNMEASURED = [
    ("firmware-only", {f"pcr.sha256.{i}": "11" * 32 for i in range(8)}),
    ("classic-without-9", {k: v for k, v in CLASSIC.items() if k != "pcr.sha256.9"}),
    ("uki-without-11", {k: v for k, v in UKI.items() if k != "pcr.sha384.11"}),
    ("sha1-bank-only", {f"pcr.sha1.{i}": "11" * 20 for i in range(10)}),
    ("nothing", {}),
]


@pytest.mark.parametrize("registers", [u[1] for u in UNMEASURED], ids=[u[0] for u in UNMEASURED])
def test_a_tpm_manifest_that_leaves_the_os_unmeasured_is_refused(registers: dict[str, str]) -> None:
    with pytest.raises(ManifestError, match=r"boot chain up to the OS.*allow_unmeasured_os"):
        _manifest("tpm", registers=registers)
    text = _manifest("tpm", registers=registers, allow_unmeasured_os=True).to_toml()
    with pytest.raises(ManifestError, match="boot chain"):
        ReferenceValues.from_toml(text.replace("allow_unmeasured_os = true\n", ""))


def test_allow_unmeasured_os_round_trips_and_warns_like_simulation() -> None:
    manifest = _manifest("tpm", registers={}, allow_unmeasured_os=True)
    text = manifest.to_toml()
    assert UNMEASURED_OS_WARNING in text
    assert ReferenceValues.from_toml(text) == manifest
    assert manifest.warnings == (UNMEASURED_OS_WARNING,)
    assert _manifest("sim").warnings == (SIMULATION_WARNING,)


INVALID = [
    ("sim-without-allow-simulation", "sim", {"allow_simulation": False}, "can never pass"),
    ("unknown-platform", "vax", {"registers": {}}, "not one of"),
    ("short-mrtd", "tdx", {"registers": {**pinned_registers("tdx"), "mrtd": "00"}}, "mrtd must be 48 bytes"),
    ("long-mrenclave", "sgx", {"registers": {"mrenclave": "00" * 48}}, "mrenclave must be 32 bytes"),
    ("short-measurement", "sev-snp", {"registers": {"measurement": "00" * 32}}, "48 bytes"),
    (
        "unknown-tdx-register",
        "tdx",
        {"registers": {**pinned_registers("tdx"), "mrfoo": "00"}},
        "never in tdx",
    ),
    (
        "sha256-pcr-of-sha384-length",
        "tpm",
        {"registers": {**CLASSIC, "pcr.sha256.12": "00" * 48}},
        "32 bytes",
    ),
    ("pcr-out-of-range", "tpm", {"registers": {**CLASSIC, "pcr.sha256.24": "00" * 32}}, "never in tpm"),
    ("pcr-unknown-bank", "tpm", {"registers": {**CLASSIC, "pcr.md5.12": "00" * 16}}, "never in tpm"),
    ("pinned-app-pcr", "tpm", {"registers": {**CLASSIC, "pcr.sha256.15": "00" * 32}}, "application PCR"),
    ("app-pcr-in-boot-chain", "tpm", {"tpm_app_pcr": 8}, "boot-chain"),
    ("app-pcr-resettable", "tpm", {"tpm_app_pcr": 16}, "resettable"),
    ("unmeasured-os-off-tpm", "tdx", {"allow_unmeasured_os": True}, "for tpm manifests"),
]


@pytest.mark.parametrize(
    ("platform", "changes", "reason"), [i[1:] for i in INVALID], ids=[i[0] for i in INVALID]
)
def test_a_manifest_that_can_never_pass_is_refused(
    platform: str, changes: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ManifestError, match=reason):
        _manifest(platform, **changes)


def test_a_sim_manifest_without_allow_simulation_is_refused_from_toml() -> None:
    text = _manifest("sim").to_toml().replace("allow_simulation = true", "allow_simulation = false")
    with pytest.raises(ManifestError, match="can never pass"):
        ReferenceValues.from_toml(text)


def test_allow_unmeasured_os_must_be_a_boolean() -> None:
    text = _manifest("tpm").to_toml().replace("app_pcr = 15", 'app_pcr = 15\nallow_unmeasured_os = "yes"')
    with pytest.raises(ManifestError, match="true or false"):
        ReferenceValues.from_toml(text)
