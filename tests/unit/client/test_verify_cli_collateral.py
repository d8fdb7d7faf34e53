"""custos-verify with Intel collateral as PCS serves it: files recognised by issuer, or fetched (--pccs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.verify_cli import main
from testkit.pcs import PcsDouble, pcs_double

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
INTEL = VECTORS / "intel-collateral"
QUOTE = VECTORS / "tdx" / "gotdx_ccel_cos-113-tdx-quote.dat"  # FMSPC 00806F050000, PCK Platform CA
AT = ("--at", "2025-10-20T00:00:00Z")
ROOT_CRL = bytes.fromhex(
    json.loads((VECTORS / "tdx" / "dcapqvl_tdx_quote_collateral.json").read_bytes())["root_ca_crl"]
)
SIGNING_CHAIN = INTEL / "derived_intel_sgx_tcb_signing_chain.pem"
PLATFORM_CHAIN = INTEL / "derived_intel_sgx_pck_platform_ca_chain.pem"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main(["--platform", "tdx", str(QUOTE), *AT, *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_crls_and_issuer_chains_are_recognised_by_their_issuer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root_crl = tmp_path / "rootcacrl.der"
    root_crl.write_bytes(ROOT_CRL)
    files = [
        INTEL / "automata_1025_tcb_info.json",
        INTEL / "automata_1025_identity.json",
        SIGNING_CHAIN,
        INTEL / "automata_1025_pck_crl.der",
        PLATFORM_CHAIN,
        root_crl,
    ]
    code, doc = _run(capsys, *(arg for f in files for arg in ("--collateral", str(f))))
    assert code == 0, doc
    assert doc["checks_not_done"] == {}
    assert doc["claims"]["tcb_status"] == "UpToDate"  # type: ignore[index]


def test_a_signing_chain_without_a_signed_document_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _run(capsys, "--collateral", str(SIGNING_CHAIN))
    assert code == 3
    assert "TCB Signing issuer chain was given without" in str(doc["error"])


@pytest.fixture
def pcs() -> Iterator[PcsDouble]:
    with pcs_double() as double:
        chain = SIGNING_CHAIN.read_bytes()
        double.tcb_info("tdx", "00806F050000", (INTEL / "automata_1025_tcb_info.json").read_bytes(), chain)
        double.qe_identity("tdx", (INTEL / "automata_1025_identity.json").read_bytes(), chain)
        double.pck_crl(
            "platform", (INTEL / "automata_1025_pck_crl.der").read_bytes(), PLATFORM_CHAIN.read_bytes()
        )
        double.root_ca_crl(ROOT_CRL)
        yield double


def test_pccs_fetches_what_the_quote_needs(capsys: pytest.CaptureFixture[str], pcs: PcsDouble) -> None:
    code, doc = _run(capsys, "--pccs", pcs.url)
    assert code == 0, doc
    assert doc["checks_not_done"] == {}
    assert "/tdx/certification/v4/tcb?fmspc=00806F050000" in pcs.requests


def test_an_unreachable_pccs_is_one_line_naming_the_url(
    capsys: pytest.CaptureFixture[str], pcs: PcsDouble
) -> None:
    pcs.answers.clear()
    assert main(["--platform", "tdx", str(QUOTE), *AT, "--pccs", pcs.url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("custos-verify: cannot fetch the collateral")
    assert f"{pcs.url}/tdx/certification/v4/tcb?fmspc=00806F050000: HTTP 404" in err
    assert len(err.splitlines()) == 1


def test_a_pccs_that_is_not_a_url_is_misuse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--platform", "tdx", str(QUOTE), "--pccs", "ftp://x"])
    assert exit_.value.code == 2
