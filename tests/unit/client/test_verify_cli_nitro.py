"""custos-verify --platform nitro against the real AWS documents in shared/vectors/nitro."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from client.verify_cli import main
from enclave.attestation import ReferenceValues

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
PRODUCTION = VECTORS / "nitro/blocky_nitro_attestation.b64"
DEBUG = VECTORS / "nitro/blocky_nitro_attestation_debug.b64"
BLINDAI = VECTORS / "nitro/blindai_nitro_attestation_document_valid.cbor"
SELF_SIGNED = VECTORS / "nitro/blocky_selfsigned_attestation.b64"
PRODUCTION_PCRS = {
    "pcr0": "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9"
    "f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a",
    "pcr1": "0343b056cd8485ca7890ddd833476d78460aed2aa161548e"
    "4e26bedf321726696257d623e8805f3f605946b3d8b0c6aa",
    "pcr2": "d5dcbdea0aa39c802f9d55ced2ea6e4d74ecec5f08fe40c5"
    "08882639c9090642669106a062a3e24ee2805a3024b9b75c",
}


@pytest.fixture(autouse=True)
def _vectors_present() -> None:
    if not PRODUCTION.is_file():
        pytest.fail(f"the Nitro vectors are missing: expected {PRODUCTION}")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["--platform", "nitro", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _manifest(tmp_path: Path, platform: str = "nitro-enclave", **changes: Any) -> Path:
    zero = "00" * 48
    reference = ReferenceValues(
        platform=platform,
        allow_simulation=False,
        custodian_ca_sha256="00" * 32,
        code_sha384="00" * 48,
        **{"registers": {"pcr0": zero, "pcr1": zero, "pcr2": zero}, **changes},
    )
    path = tmp_path / "manifest.toml"
    path.write_text(reference.to_toml())
    return path


@pytest.mark.parametrize("path", [PRODUCTION, DEBUG, BLINDAI], ids=["production", "debug", "blindai-cbor"])
def test_real_documents_verify_at_their_own_time(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, doc = _run(capsys, str(path))
    assert code == 0, doc
    assert doc["platform"] == "nitro-enclave"
    assert doc["verified"] is True
    assert "time" in doc["checks_not_done"]
    claims = doc["claims"]
    assert claims["checked_at"] == claims["timestamp"]
    assert len(claims["chain"]) == 5
    assert claims["chain"][0]["sha256"].startswith("641a0321a3e244ef")


def test_text_output_shows_module_time_pcrs_and_chain(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--platform", "nitro", str(PRODUCTION)]) == 0
    out = capsys.readouterr().out
    assert "VERIFIED" in out
    assert "module: i-0a22e5c5f24d22174-enc0191cceb4289903f" in out
    assert "time: 2024-09-07T14:37:39.545000+00:00" in out
    assert f"   0  {PRODUCTION_PCRS['pcr0']}" in out
    assert "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US" in out


def test_raw_cbor_of_a_base64_document_reads_alike(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    raw = tmp_path / "doc.cbor"
    raw.write_bytes(base64.b64decode(PRODUCTION.read_bytes()))
    code, doc = _run(capsys, str(raw))
    assert code == 0
    assert doc["claims"]["pcrs"]["0"] == PRODUCTION_PCRS["pcr0"]


def test_at_a_time_the_leaf_had_expired_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(capsys, str(PRODUCTION), "--at", "2024-09-07T18:00:00Z")
    assert code == 3
    assert "expired at 2024-09-07T17:37:39" in doc["error"]
    assert doc["claims"]["unverified"]["module_id"] == "i-0a22e5c5f24d22174-enc0191cceb4289903f"


def test_at_a_time_within_the_leaf_validity_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(capsys, str(PRODUCTION), "--at", "2024-09-07T15:00:00Z")
    assert code == 0
    assert "time" not in doc["checks_not_done"]


def test_at_a_time_before_the_document_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(capsys, str(PRODUCTION), "--at", "2024-09-07T14:37:00Z")
    assert code == 3
    assert "not valid before 2024-09-07T14:37:36" in doc["error"]


def test_self_signed_document_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(capsys, str(SELF_SIGNED))
    assert code == 3
    assert doc["verified"] is False


def test_nonce_is_compared_when_given(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(capsys, str(PRODUCTION), "--nonce", "01" * 1024)
    assert code == 0
    assert "nonce equals --nonce" in doc["checks_done"]
    code, doc = _run(capsys, str(PRODUCTION), "--nonce", "02" * 64)
    assert code == 3
    assert "nonce" in doc["error"]


def test_production_document_meets_its_manifest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, registers=PRODUCTION_PCRS)
    code, doc = _run(capsys, str(PRODUCTION), "--manifest", str(manifest))
    assert code == 0, doc
    assert doc["mismatches"] == []


@pytest.mark.parametrize("path", [DEBUG, BLINDAI], ids=["blocky-debug", "blindai"])
def test_debug_document_is_refused_by_a_default_manifest_and_accepted_with_allow_debug(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, path: Path
) -> None:
    code, doc = _run(capsys, str(path), "--manifest", str(_manifest(tmp_path)))
    assert code == 3
    assert any("debug mode" in m for m in doc["mismatches"])
    code, doc = _run(capsys, str(path), "--manifest", str(_manifest(tmp_path, allow_debug=True)))
    assert code == 0, doc
    assert doc["mismatches"] == []


def test_a_nitro_tpm_manifest_does_not_pass_an_enclave_document(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest = _manifest(
        tmp_path, "nitro-tpm", registers={"pcr4": "00" * 48, "pcr7": "00" * 48, "pcr12": "00" * 48}
    )
    code, doc = _run(capsys, str(PRODUCTION), "--manifest", str(manifest))
    assert code == 3
    assert any("manifest is for platform 'nitro-tpm'" in m for m in doc["mismatches"])


def test_pcr_mismatch_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, registers={**PRODUCTION_PCRS, "pcr2": "ab" * 48})
    code, doc = _run(capsys, str(PRODUCTION), "--manifest", str(manifest))
    assert code == 3
    assert doc["mismatches"] == [f"register pcr2 is {PRODUCTION_PCRS['pcr2']}, manifest expects {'ab' * 48}"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--platform", "nitro"], "needs an EVIDENCE file"),
        (["--platform", "nitro", str(PRODUCTION), "--certs", str(PRODUCTION)], "does not take --certs"),
        (["--platform", "nitro", str(PRODUCTION), "--nonce", "zz"], "--nonce must be hex"),
        (["--platform", "nitro", str(PRODUCTION), "--at", "yesterday"], "not an ISO 8601 time"),
    ],
    ids=["no-document", "certs", "bad-nonce", "bad-time"],
)
def test_misuse_exits_2_with_the_reason(argv: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "client.verify_cli", *argv], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_and_garbage_files_say_why(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, doc = _run(capsys, str(tmp_path / "missing.b64"))
    assert code == 1
    assert "cannot read" in doc["reason"]
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x84\x00")
    code, doc = _run(capsys, str(garbage))
    assert code == 3
    assert "Nitro attestation document" in doc["error"]
