"""custos-verify against the real vendor evidence in shared/vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.verify_cli import main
from enclave.attestation import ReferenceValues
from enclave.attestation.dcap_quote import parse_quote

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"


@pytest.fixture(autouse=True)
def _vectors_present() -> None:
    if not VECTORS.is_dir():
        pytest.fail(f"the attestation vectors are missing: expected {VECTORS}")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_tdx_quote_with_combined_collateral_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(
        capsys,
        "--platform",
        "tdx",
        str(VECTORS / "tdx/dcapqvl_tdx_quote.bin"),
        "--collateral",
        str(VECTORS / "tdx/dcapqvl_tdx_quote_collateral.json"),
        "--at",
        "2025-07-01T00:00:00Z",
    )
    assert code == 0
    assert doc["verified"] is True
    assert "tcb_level" in doc["checks_done"]  # type: ignore[operator]


def test_tdx_quote_without_collateral_names_what_was_not_checked(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(
        capsys,
        "--platform",
        "tdx",
        str(VECTORS / "tdx/dcapqvl_tdx_quote.bin"),
        "--at",
        "2025-07-01T00:00:00Z",
    )
    assert code == 0
    assert "tcb_info" in doc["checks_not_done"]  # type: ignore[operator]


def test_no_matching_tcb_level_is_refused_and_claims_still_shown(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(
        capsys,
        "--platform",
        "tdx",
        str(VECTORS / "tdx/dcapqvl_tdx_quote_outdated.bin"),
        "--collateral",
        str(VECTORS / "tdx/dcapqvl_tdx_quote_outdated_collateral.json"),
        "--at",
        "2026-03-01T00:00:00Z",
    )
    assert code == 3
    assert "no matching TCB level" in str(doc["error"])
    assert "unverified" in doc["claims"]  # type: ignore[operator]


def test_sev_snp_report_verifies_and_manifest_mismatch_is_listed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = [
        "--platform",
        "sev-snp",
        str(VECTORS / "sev-snp/trustee_test-report.bin"),
        "--certs",
        str(VECTORS / "sev-snp/trustee_test-vcek.der"),
        "--certs",
        str(VECTORS / "sev-snp/trustee_milan_ask_ark_asvk.pem"),
        "--at",
        "2025-01-01T00:00:00Z",
    ]
    code, doc = _run(capsys, *args)
    assert code == 0
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        ReferenceValues(
            platform="sev-snp",
            allow_simulation=False,
            custodian_ca_sha256="00" * 32,
            code_sha384="00" * 48,
            registers={"measurement": "11" * 48},
        ).to_toml()
    )
    code, doc = _run(capsys, *args, "--manifest", str(manifest))
    assert code == 3
    assert any("measurement" in m for m in doc["mismatches"])  # type: ignore[union-attr]


def test_wrong_platform_for_the_quote_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(
        capsys,
        "--platform",
        "sgx",
        str(VECTORS / "tdx/dcapqvl_tdx_quote.bin"),
        "--at",
        "2025-07-01T00:00:00Z",
    )
    assert code == 3
    assert "TDX" in str(doc["error"])


def test_tpm_needs_its_three_files() -> None:
    with pytest.raises(SystemExit) as info:
        main(["--platform", "tpm", "--quote", "q.bin"])
    assert info.value.code == 2


def test_a_manifest_requires_the_tcb_collateral(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = tmp_path / "tdx.toml"
    quote = str(VECTORS / "tdx/dcapqvl_tdx_quote.bin")
    # The build this quote came from: its boot registers, as `enclave manifest --register` pins them.
    registers = parse_quote(Path(quote).read_bytes()).body.registers()
    manifest.write_text(
        ReferenceValues(
            platform="tdx",
            allow_simulation=False,
            custodian_ca_sha256="00" * 32,
            code_sha384="00" * 48,
            registers={name: registers[name].hex() for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2")},
        ).to_toml()
    )
    code, doc = _run(
        capsys, "--platform", "tdx", quote, "--at", "2025-07-01T00:00:00Z", "--manifest", str(manifest)
    )
    assert code == 3
    assert any("not evaluated" in m for m in doc["mismatches"])  # type: ignore[union-attr]
    code, doc = _run(
        capsys,
        "--platform",
        "tdx",
        quote,
        "--at",
        "2025-07-01T00:00:00Z",
        "--manifest",
        str(manifest),
        "--collateral",
        str(VECTORS / "tdx/dcapqvl_tdx_quote_collateral.json"),
    )
    assert code == 0, doc["mismatches"]
