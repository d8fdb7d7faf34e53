"""custos-verify --ak-cert: only an AK certificate for a TPMT_PUBLIC AK establishes AK trust."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from client.verify_cli import main
from tests.unit.enclave.test_tpm_ak import der, make_pki, pem
from tests.unit.enclave.test_tpm_marshal import NOW, REPORT_DATA, SELECTION, spki, tpm_for
from tests.unit.enclave.test_tpm_marshal import pcr_json as pcr_values_json


def _run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    ak_encoding: str,
    leaf_usages: list[x509.ObjectIdentifier] | None,
) -> tuple[int, dict[str, object]]:
    tpm = tpm_for()
    pki = make_pki(tpm.key, leaf_usages=leaf_usages)
    evidence = tpm.evidence(REPORT_DATA, SELECTION)
    files = {
        "quote": evidence.parts["quote"],
        "signature": evidence.parts["signature"],
        "ak": tpm.ak() if ak_encoding == "tpmt_public" else spki(tpm.key),
        "pcrs": pcr_values_json(tpm.values(SELECTION)),
        "ak-cert": der(pki.leaf),
        "certs": pem(pki.root, pki.intermediate),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    argv = ["--platform", "tpm", "--at", NOW.isoformat(), "--json"]
    argv += [arg for name in files for arg in (f"--{name}", str(tmp_path / name))]
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_an_ak_certificate_for_a_tpmt_public_ak_is_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = _run(tmp_path, capsys, ak_encoding="tpmt_public", leaf_usages=None)
    assert code == 0
    assert "AK certificate chain to the given root" in doc["checks_done"]  # type: ignore[operator]


@pytest.mark.parametrize(
    ("ak_encoding", "leaf_usages", "reason"),
    [
        ("tpmt_public", [ExtendedKeyUsageOID.CLIENT_AUTH], "extended key usage clientAuth"),
        ("tpmt_public", [], "has no extended key usage"),
        ("spki", None, "bare spki key"),
    ],
    ids=["enclave-client-certificate", "no-usage", "bare-key-ak"],
)
def test_anything_else_is_refused_with_exit_3(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ak_encoding: str,
    leaf_usages: list[x509.ObjectIdentifier] | None,
    reason: str,
) -> None:
    code, doc = _run(tmp_path, capsys, ak_encoding=ak_encoding, leaf_usages=leaf_usages)
    assert code == 3
    assert doc["verified"] is False
    assert reason in str(doc["error"])
