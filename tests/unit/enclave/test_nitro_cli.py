"""``enclave manifest`` and ``enclave serve`` for the Nitro platforms: pins, flags, misuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from enclave._daemon.cli import main
from enclave.attestation import ReferenceValues
from tests.unit.enclave.fake_custodian import CertAuthority

PCR = {i: f"{0xA0 + i:02x}" * 48 for i in range(25)}


@pytest.fixture(autouse=True)
def _no_enclave_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ENCLAVE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(CertAuthority("custodian test CA").pem)
    return path


def _pins(*indices: int) -> list[str]:
    return [arg for i in indices for arg in ("--register", f"pcr{i}={PCR[i]}")]


@pytest.mark.parametrize(
    ("platform", "indices"),
    [("nitro-enclave", (0, 1, 2)), ("nitro-enclave", (0, 1, 2, 8)), ("nitro-tpm", (4, 7, 12))],
    ids=["enclave", "enclave-signing-certificate", "tpm"],
)
def test_manifest_pins_the_pcrs_given(
    ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], platform: str, indices: tuple[int, ...]
) -> None:
    out = tmp_path / "m.toml"
    argv = ["manifest", "--platform", platform, "--custodian-ca", str(ca), "--out", str(out), "--json"]
    assert main([*argv, *_pins(*indices)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["registers"] == {f"pcr{i}": PCR[i] for i in indices}
    reference = ReferenceValues.from_toml(out.read_text())
    assert reference.platform == platform
    assert not reference.allow_debug
    assert ("allow_debug = false" in out.read_text()) is (platform == "nitro-enclave")


@pytest.mark.parametrize(
    ("platform", "indices", "message"),
    [
        ("nitro-enclave", (0, 1), "missing: pcr2"),
        ("nitro-tpm", (4, 7), "missing: pcr12"),
        ("nitro-tpm", (4, 7, 12, 24), "pcr24"),
    ],
    ids=["enclave-no-pcr2", "tpm-no-pcr12", "tpm-pcr24"],
)
def test_manifest_that_can_never_pass_is_refused(
    ca: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    platform: str,
    indices: tuple[int, ...],
    message: str,
) -> None:
    out = tmp_path / "m.toml"
    argv = ["manifest", "--platform", platform, "--custodian-ca", str(ca), "--out", str(out)]
    assert main([*argv, *_pins(*indices)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--platform", "nitro-enclave", "--nitro-tpm-attest", "x"],
            "--nitro-tpm-attest is for --platform nitro-tpm",
        ),
        (
            ["--platform", "nitro-tpm", "--nsm-device", "/dev/nsm"],
            "--nsm-device is for --platform nitro-enclave",
        ),
        (["--platform", "sim", "--nsm-device", "/dev/nsm"], "--nsm-device is for --platform nitro-enclave"),
        (["--platform", "nitro-enclave", "--tsm-entry", "/tmp"], "are for tdx, sev-snp and sgx"),
    ],
    ids=["tool-on-enclave", "device-on-tpm", "device-on-sim", "tsm-on-nitro"],
)
def test_serve_flags_of_another_platform_are_misuse(
    ca: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    common = ["serve", "--custodian", "127.0.0.1:1", "--custodian-ca", str(ca), "--deployment", "d"]
    common += ["--token", "t", "--listen", "127.0.0.1:0"]
    assert main([*common, *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_without_the_nsm_says_where_it_runs(
    ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["serve", "--custodian", "127.0.0.1:1", "--custodian-ca", str(ca), "--deployment", "d"]
    common += ["--token", "t", "--listen", "127.0.0.1:0", "--platform", "nitro-enclave"]
    assert main([*common, "--nsm-device", str(tmp_path / "nsm")]) == 1
    assert "runs inside a Nitro Enclave" in capsys.readouterr().err
