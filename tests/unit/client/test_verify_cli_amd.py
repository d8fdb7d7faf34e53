"""custos-verify --amd-kds and the SEV-SNP CRL, against a local KDS of recorded documents."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.verify_cli import main
from tests.unit.collateral.fake_kds import (
    GOSEV_CHAIN,
    GOSEV_REPORT,
    GOSEV_VCEK,
    GOSEV_VCEK_PATH,
    FakeKds,
    serving,
)

AT = ("--at", "2026-11-21T00:00:00Z")


@pytest.fixture
def kds() -> Iterator[FakeKds]:
    with serving(FakeKds.recorded()) as fake:
        yield fake


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main([*argv, *AT, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out else {}


def test_without_certificates_or_kds_the_vcek_is_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(capsys, "--platform", "sev-snp", str(GOSEV_REPORT))
    assert code == 3
    assert "--certs FILE or --amd-kds" in str(doc["error"])


def test_kds_gives_the_certificates_but_a_crl_it_lacks_fails_the_run(
    capsys: pytest.CaptureFixture[str], kds: FakeKds
) -> None:
    code = main(["--platform", "sev-snp", str(GOSEV_REPORT), "--amd-kds", kds.url, *AT])
    captured = capsys.readouterr()
    assert code == 1
    assert "/vcek/v1/Milan/crl: HTTP 404" in captured.err
    assert kds.requests == [GOSEV_VCEK_PATH, "/vcek/v1/Milan/cert_chain", "/vcek/v1/Milan/crl"]


def test_a_crl_given_beside_kds_is_checked(
    capsys: pytest.CaptureFixture[str], kds: FakeKds, tmp_path: Path
) -> None:
    crl = tmp_path / "crl.der"
    crl.write_bytes(b"not a CRL")
    code, doc = _run(
        capsys, "--platform", "sev-snp", str(GOSEV_REPORT), "--amd-kds", kds.url, "--collateral", f"crl={crl}"
    )
    assert code == 3
    assert "AMD CRL does not parse" in str(doc["error"])


def test_certificates_given_are_used_and_revocation_is_named_unchecked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = _run(
        capsys,
        "--platform",
        "sev-snp",
        str(GOSEV_REPORT),
        "--certs",
        str(GOSEV_VCEK),
        "--certs",
        str(GOSEV_CHAIN),
    )
    assert code == 0
    assert "revocation" in doc["checks_not_done"]  # type: ignore[operator]


@pytest.mark.parametrize(
    "argv",
    [("--amd-kds", "ftp://kds.example"), ("--collateral", "tcb_info=x", "--collateral", "crl=y")],
    ids=["not-http", "two-collateral"],
)
def test_misuse_exits_2(argv: tuple[str, ...], tmp_path: Path) -> None:
    for name in ("x", "y"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "--platform",
                "sev-snp",
                str(GOSEV_REPORT),
                *(a.replace("=x", f"={tmp_path}/x").replace("=y", f"={tmp_path}/y") for a in argv),
            ]
        )
    assert exited.value.code == 2
