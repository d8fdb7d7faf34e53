"""The custodian's own Intel collateral: fetched into DATA/collateral/intel, stale while PCS is down."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from custodian.collateral import CustodianCollateral
from custodian.metrics import CustodianMetrics
from enclave.attestation.interface import Evidence
from testkit.pcs import PcsDouble, pcs_double

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
INTEL = VECTORS / "intel-collateral"
QUOTE = (VECTORS / "tdx" / "gotdx_ccel_cos-113-tdx-quote.dat").read_bytes()  # FMSPC 00806F050000
SIGNING = (INTEL / "derived_intel_sgx_tcb_signing_chain.pem").read_bytes()


@pytest.fixture
def pcs() -> Iterator[PcsDouble]:
    with pcs_double() as double:
        root_crl = json.loads((VECTORS / "tdx" / "dcapqvl_tdx_quote_collateral.json").read_bytes())[
            "root_ca_crl"
        ]
        double.tcb_info("tdx", "00806F050000", (INTEL / "automata_1025_tcb_info.json").read_bytes(), SIGNING)
        double.qe_identity("tdx", (INTEL / "automata_1025_identity.json").read_bytes(), SIGNING)
        double.pck_crl(
            "platform",
            (INTEL / "automata_1025_pck_crl.der").read_bytes(),
            (INTEL / "derived_intel_sgx_pck_platform_ca_chain.pem").read_bytes(),
        )
        double.root_ca_crl(bytes.fromhex(root_crl))
        yield double


def _stale(metrics: CustodianMetrics, document: str) -> float | None:
    return metrics.registry.get_sample_value("custos_custodian_collateral_stale", {"document": document})


def test_collateral_is_cached_in_the_data_directory_and_served_while_pcs_is_down(
    pcs: PcsDouble, tmp_path: Path
) -> None:
    metrics = CustodianMetrics()
    own = CustodianCollateral.open(tmp_path, metrics, pccs_url=pcs.url, collateral_dir=None)
    evidence = Evidence(platform="tdx", parts={"quote": QUOTE}).to_bytes()
    fetched = own.for_evidence(evidence)
    assert fetched is not None
    assert set(fetched) >= {"tcb_info", "qe_identity", "pck_crl", "root_ca_crl"}
    assert (tmp_path / "collateral" / "intel" / "tdx-tcb-00806F050000.json").is_file()
    assert _stale(metrics, "tcb_info") == 0

    pcs.down = True
    again = CustodianCollateral.open(tmp_path, metrics, pccs_url=pcs.url, collateral_dir=None)
    assert again.for_evidence(evidence) == fetched  # these recorded documents are due: a refresh was tried
    assert _stale(metrics, "tcb_info") == 1


def test_an_air_gapped_directory_is_read_and_never_written(pcs: PcsDouble, tmp_path: Path) -> None:
    CustodianCollateral.open(
        tmp_path, CustodianMetrics(), pccs_url=pcs.url, collateral_dir=None
    ).for_evidence(Evidence(platform="tdx", parts={"quote": QUOTE}).to_bytes())
    offline_dir = tmp_path / "collateral" / "intel"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in offline_dir.iterdir())
    pcs.down = True
    offline = CustodianCollateral.open(
        tmp_path / "other", CustodianMetrics(), pccs_url=None, collateral_dir=offline_dir
    )
    assert offline.for_evidence(Evidence(platform="tdx", parts={"quote": QUOTE}).to_bytes()) is not None
    assert sorted((p.name, p.stat().st_mtime_ns) for p in offline_dir.iterdir()) == before
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "evidence",
    [
        Evidence(platform="sim", parts={"quote": QUOTE}).to_bytes(),
        Evidence(platform="tdx", parts={"quote": b"not a quote"}).to_bytes(),
        b"not evidence",
    ],
    ids=["not-dcap", "bad-quote", "bad-evidence"],
)
def test_no_collateral_of_our_own_is_none_never_an_error(tmp_path: Path, evidence: bytes) -> None:
    own = CustodianCollateral.open(tmp_path, CustodianMetrics(), pccs_url=None, collateral_dir=None)
    assert own.for_evidence(evidence) is None
