"""custos-verify against the real vendor evidence in shared/vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.verify_cli import _parser, main
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


TDX_QUOTE = str(VECTORS / "tdx/dcapqvl_tdx_quote.bin")
TPM_FILES = ["--quote", "q.bin", "--signature", "s.bin", "--ak", "ak.pem"]

MISUSE = [
    ("tpm-with-evidence", ["--platform", "tpm", "quote.bin", *TPM_FILES], "does not take EVIDENCE"),
    ("tdx-with-tpm-options", ["--platform", "tdx", TDX_QUOTE, "--quote", "q.bin"], "does not take --quote"),
    ("sgx-with-certs", ["--platform", "sgx", TDX_QUOTE, "--certs", "c.pem"], "does not take --certs"),
    ("sev-snp-with-pccs", ["--platform", "sev-snp", "r.bin", "--pccs"], "does not take --pccs"),
    ("tdx-with-amd-kds", ["--platform", "tdx", TDX_QUOTE, "--amd-kds"], "does not take --amd-kds"),
    ("sev-snp-with-nonce", ["--platform", "sev-snp", "r.bin", "--nonce", "00"], "does not take --nonce"),
    (
        "unknown-collateral-name",
        ["--platform", "tdx", TDX_QUOTE, "--collateral", "tcb=c.json"],
        "NAME must be",
    ),
    ("tdx-without-evidence", ["--platform", "tdx"], "EVIDENCE"),
    ("no-platform", [TDX_QUOTE], "--platform"),
    ("nonce-not-hex", ["--platform", "tpm", *TPM_FILES, "--nonce", "xyz"], "--nonce"),
    ("bad-time", ["--platform", "tdx", TDX_QUOTE, "--at", "yesterday"], "--at"),
]


@pytest.mark.parametrize(("argv", "mentions"), [pytest.param(a, m, id=n) for n, a, m in MISUSE])
def test_misuse_exits_2_naming_the_option(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert mentions in capsys.readouterr().err


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_an_unreadable_file_is_one_clear_line_or_one_json_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    absent = tmp_path / "absent.bin"
    assert main(["--platform", "tdx", str(absent), *(["--json"] if as_json else [])]) == 1
    captured = capsys.readouterr()
    reason = f"cannot read {absent}: No such file or directory"
    if as_json:
        assert json.loads(captured.out) == {"error": "FileNotFoundError", "reason": reason, "exit_code": 1}
        assert captured.err == ""
    else:
        assert captured.err == f"custos-verify: {reason}\n"


def test_help_describes_every_argument_and_its_default() -> None:
    actions = [action for action in _parser()._actions if action.dest != "help"]
    for action in actions:
        assert action.help, action.dest
        if action.default not in (None, False) or action.dest in (
            "at",
            "manifest",
            "nonce",
            "pcrs",
            "ak_cert",
        ):
            assert "default" in action.help, action.dest
    evidence = next(action for action in actions if action.dest == "evidence")
    assert "tdx, sgx, sev-snp" in str(evidence.help)


def test_a_reader_that_leaves_early_ends_quietly() -> None:
    """`custos-verify ... | head -1`: the pipe is closed before the report is written; no traceback."""
    repo = Path(__file__).resolve().parents[3]
    verify = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "client.verify_cli",
            "--platform",
            "tdx",
            TDX_QUOTE,
            "--at",
            "2025-07-01T00:00:00Z",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=repo,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)},
    )
    assert verify.stdout is not None
    verify.stdout.close()
    _, err = verify.communicate(timeout=120)
    assert err == b""
    assert verify.returncode == 1
