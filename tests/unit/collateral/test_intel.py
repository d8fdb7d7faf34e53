"""Intel collateral from a PCS v4 service, against a local server speaking the API with the real
recorded documents (``../shared/vectors``): fetch, cache, refresh, service down, expiry, wrong FMSPC.

Recorded collateral expired long ago, so every test sets the clock (``now=``) to its day.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enclave.attestation.dcap import verify_quote
from enclave.collateral.cache import CollateralCache
from enclave.collateral.intel import CollateralUnavailableError, IntelCollateral
from enclave.collateral.intel_pcs import IntelPcs, quote_needs
from enclave.errors import EvidenceError
from testkit.pcs import PcsDouble, pcs_double

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
INTEL = VECTORS / "intel-collateral"
OCTOBER = datetime(2025, 10, 20, tzinfo=UTC)  # the automata October 2025 documents are all valid
TCB_SIGNING_CHAIN = (INTEL / "derived_intel_sgx_tcb_signing_chain.pem").read_bytes()
PLATFORM_CA_CHAIN = (INTEL / "derived_intel_sgx_pck_platform_ca_chain.pem").read_bytes()
PROCESSOR_CA_CHAIN = (INTEL / "derived_intel_sgx_pck_processor_ca_chain.pem").read_bytes()
COS_QUOTE = (VECTORS / "tdx" / "gotdx_ccel_cos-113-tdx-quote.dat").read_bytes()  # FMSPC 00806F050000
DCAPQVL_TDX = json.loads((VECTORS / "tdx" / "dcapqvl_tdx_quote_collateral.json").read_bytes())
SGX_QUOTE = (VECTORS / "sgx" / "dcapqvl_sgx_quote.bin").read_bytes()  # FMSPC 00A067110000, Processor CA


def _no_sleep(_: float) -> None:
    pass


def _serve_2025_tdx(pcs: PcsDouble, tcb_info: str = "automata_1025_tcb_info.json") -> None:
    """Recorded PCS answers for FMSPC 00806F050000 (automata: TCB info of June or October 2025,
    TD QE identity and Platform CA CRL of October 2025) and dcap-qvl's Root CA CRL (2025-03)."""
    pcs.tcb_info("tdx", "00806F050000", (INTEL / tcb_info).read_bytes(), TCB_SIGNING_CHAIN)
    pcs.qe_identity("tdx", (INTEL / "automata_1025_identity.json").read_bytes(), TCB_SIGNING_CHAIN)
    pcs.pck_crl("platform", (INTEL / "automata_1025_pck_crl.der").read_bytes(), PLATFORM_CA_CHAIN)
    pcs.root_ca_crl(bytes.fromhex(DCAPQVL_TDX["root_ca_crl"]))


@pytest.fixture
def pcs() -> Iterator[PcsDouble]:
    with pcs_double() as double:
        yield double


def _collateral(pcs: PcsDouble, cache: CollateralCache, now: datetime, **kw: object) -> IntelCollateral:
    service = IntelPcs(pcs.url, attempts=2, sleep=_no_sleep)
    return IntelCollateral(cache, service, now=lambda: now, **kw)  # type: ignore[arg-type]


def test_a_quote_names_its_tee_fmspc_and_pck_ca() -> None:
    tdx = quote_needs(COS_QUOTE)
    assert (tdx.tee, tdx.fmspc, tdx.ca) == ("tdx", "00806F050000", "platform")
    sgx = quote_needs(SGX_QUOTE)
    assert (sgx.tee, sgx.fmspc, sgx.ca) == ("sgx", "00A067110000", "processor")


def test_fetched_collateral_verifies_the_quote_and_is_cached(pcs: PcsDouble, tmp_path: Path) -> None:
    _serve_2025_tdx(pcs)
    cache = CollateralCache(tmp_path / "intel")
    collateral = _collateral(pcs, cache, OCTOBER).for_quote(COS_QUOTE)
    assert sorted(pcs.requests) == [
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
        "/sgx/certification/v4/rootcacrl",
        "/tdx/certification/v4/qe/identity",
        "/tdx/certification/v4/tcb?fmspc=00806F050000",
    ]
    assert collateral["tcb_info_issuer_chain"] == TCB_SIGNING_CHAIN  # URL-decoded from the header
    result = verify_quote(COS_QUOTE, now=OCTOBER, collateral=collateral)
    assert result.tcb_status == "UpToDate"
    assert result.checks_not_done == {}
    assert sorted(p.name for p in (tmp_path / "intel").iterdir()) == [
        "pckcrl-platform.der",
        "pckcrl-platform.issuer-chain.pem",
        "rootcacrl.der",
        "tdx-qe-identity.issuer-chain.pem",
        "tdx-qe-identity.json",
        "tdx-tcb-00806F050000.issuer-chain.pem",
        "tdx-tcb-00806F050000.json",
    ]


def test_a_fresh_cache_answers_without_asking_the_service(pcs: PcsDouble, tmp_path: Path) -> None:
    _serve_2025_tdx(pcs)
    cache = CollateralCache(tmp_path)
    first = _collateral(pcs, cache, OCTOBER, max_age=timedelta(days=365)).for_quote(COS_QUOTE)
    pcs.requests.clear()
    again = _collateral(pcs, cache, OCTOBER, max_age=timedelta(days=365)).for_quote(COS_QUOTE)
    assert pcs.requests == []
    assert again == first


def _issue_date(collateral: dict[str, bytes]) -> str:
    return str(json.loads(collateral["tcb_info"])["tcbInfo"]["issueDate"])


def test_a_document_is_fetched_again_before_its_next_update_and_never_rolled_back(
    pcs: PcsDouble, tmp_path: Path
) -> None:
    cache = CollateralCache(tmp_path)
    june = datetime(2025, 6, 10, tzinfo=UTC)
    _serve_2025_tdx(pcs, "automata_0625_tcbinfov3_00806f050000.json")
    assert _issue_date(_collateral(pcs, cache, june).for_quote(COS_QUOTE)).startswith("2025-06-04")

    # Past the June copy's nextUpdate the service has October's: it replaces the cached one.
    _serve_2025_tdx(pcs, "automata_1025_tcb_info.json")
    pcs.requests.clear()
    october = datetime(2025, 10, 20, tzinfo=UTC)
    assert _issue_date(_collateral(pcs, cache, october).for_quote(COS_QUOTE)).startswith("2025-10-19")
    assert "/tdx/certification/v4/tcb?fmspc=00806F050000" in pcs.requests

    # A service that later sends the June copy again cannot roll the cache back.
    _serve_2025_tdx(pcs, "automata_0625_tcbinfov3_00806f050000.json")
    later = datetime(2025, 10, 25, tzinfo=UTC)
    assert _issue_date(_collateral(pcs, cache, later).for_quote(COS_QUOTE)).startswith("2025-10-19")
    assert json.loads(cache.read("tdx-tcb-00806F050000.json") or b"")["tcbInfo"]["issueDate"].startswith(
        "2025-10-19"
    )


def test_the_cache_is_served_while_the_service_is_down_and_says_so(
    pcs: PcsDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _serve_2025_tdx(pcs)
    cache = CollateralCache(tmp_path)
    cached = _collateral(pcs, cache, OCTOBER).for_quote(COS_QUOTE)
    pcs.down = True
    stale: list[tuple[str, bool]] = []
    later = OCTOBER + timedelta(days=2)
    with caplog.at_level(logging.WARNING, logger="enclave.collateral.intel"):
        served = _collateral(pcs, cache, later, on_stale=lambda k, s: stale.append((k, s))).for_quote(
            COS_QUOTE
        )
    assert served == cached
    assert ("tcb_info", True) in stale
    assert "serving the cached tdx-tcb-00806F050000.json" in caplog.text
    assert "HTTP 503" in caplog.text
    # Still valid on that day, so the quote verifies from the cached copy.
    assert verify_quote(COS_QUOTE, now=later, collateral=served).tcb_status == "UpToDate"


def test_expired_collateral_served_from_the_cache_is_refused(pcs: PcsDouble, tmp_path: Path) -> None:
    _serve_2025_tdx(pcs)
    cache = CollateralCache(tmp_path)
    _collateral(pcs, cache, OCTOBER).for_quote(COS_QUOTE)
    pcs.down = True
    after_next_update = datetime(2025, 11, 20, tzinfo=UTC)
    served = _collateral(pcs, cache, after_next_update).for_quote(COS_QUOTE)
    with pytest.raises(EvidenceError, match="expired"):
        verify_quote(COS_QUOTE, now=after_next_update, collateral=served)


def test_down_without_a_cached_copy_is_an_error_naming_the_url(pcs: PcsDouble, tmp_path: Path) -> None:
    pcs.down = True
    collateral = _collateral(pcs, CollateralCache(tmp_path), OCTOBER)
    with pytest.raises(CollateralUnavailableError, match=rf"{pcs.url}/tdx/certification/v4/.*HTTP 503"):
        collateral.for_quote(COS_QUOTE)
    # Not asked again at every quote: an enclave's attestation would wait on it each time.
    asked = len(pcs.requests)
    with pytest.raises(CollateralUnavailableError, match="the last fetch failed; retrying after"):
        collateral.for_quote(COS_QUOTE)
    assert len(pcs.requests) == asked


def test_tcb_info_for_another_fmspc_is_refused_and_not_cached(pcs: PcsDouble, tmp_path: Path) -> None:
    _serve_2025_tdx(pcs)
    other = (INTEL / "gotdx_sample_tcbInfo_response").read_bytes()  # FMSPC 50806F000000
    pcs.tcb_info("tdx", "00806F050000", other, TCB_SIGNING_CHAIN)
    cache = CollateralCache(tmp_path)
    with pytest.raises(CollateralUnavailableError, match=r"wrong tcb_info: tcbInfo.fmspc is '50806f000000'"):
        _collateral(pcs, cache, OCTOBER).for_quote(COS_QUOTE)
    assert cache.read("tdx-tcb-00806F050000.json") is None


def test_a_missing_issuer_chain_header_is_an_error(pcs: PcsDouble, tmp_path: Path) -> None:
    _serve_2025_tdx(pcs)
    pcs.answers["/tdx/certification/v4/qe/identity"].headers.clear()
    with pytest.raises(CollateralUnavailableError, match="no SGX-Enclave-Identity-Issuer-Chain header"):
        _collateral(pcs, CollateralCache(tmp_path), OCTOBER).for_quote(COS_QUOTE)


def test_sgx_collateral_from_the_service_verifies_an_sgx_quote(pcs: PcsDouble, tmp_path: Path) -> None:
    doc = json.loads((VECTORS / "sgx" / "dcapqvl_sgx_quote_collateral.json").read_bytes())
    tcb = f'{{"tcbInfo":{doc["tcb_info"]},"signature":"{doc["tcb_info_signature"]}"}}'.encode()
    identity = f'{{"enclaveIdentity":{doc["qe_identity"]},"signature":"{doc["qe_identity_signature"]}"}}'
    pcs.tcb_info("sgx", "00A067110000", tcb, doc["tcb_info_issuer_chain"].encode())
    pcs.qe_identity("sgx", identity.encode(), doc["qe_identity_issuer_chain"].encode())
    pcs.pck_crl("processor", bytes.fromhex(doc["pck_crl"]), PROCESSOR_CA_CHAIN)
    pcs.root_ca_crl(bytes.fromhex(doc["root_ca_crl"]))
    when = datetime(2025, 6, 20, tzinfo=UTC)
    collateral = _collateral(pcs, CollateralCache(tmp_path), when).for_quote(SGX_QUOTE)
    result = verify_quote(SGX_QUOTE, now=when, collateral=collateral)
    assert result.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert result.checks_not_done == {}


def test_an_air_gapped_directory_is_read_and_names_what_it_lacks(pcs: PcsDouble, tmp_path: Path) -> None:
    _serve_2025_tdx(pcs)
    _collateral(pcs, CollateralCache(tmp_path), OCTOBER).for_quote(COS_QUOTE)
    offline = IntelCollateral(CollateralCache(tmp_path, read_only=True), None, now=lambda: OCTOBER)
    collateral = offline.for_quote(COS_QUOTE)
    assert verify_quote(COS_QUOTE, now=OCTOBER, collateral=collateral).tcb_status == "UpToDate"
    (tmp_path / "rootcacrl.der").unlink()
    with pytest.raises(CollateralUnavailableError, match=r"no rootcacrl\.der in the collateral directory"):
        offline.for_quote(COS_QUOTE)


def test_an_authenticating_cache_keeps_a_forged_document_out(pcs: PcsDouble, tmp_path: Path) -> None:
    _serve_2025_tdx(pcs)
    cache = CollateralCache(tmp_path)
    genuine = _collateral(pcs, cache, OCTOBER, authenticate=True).for_quote(COS_QUOTE)
    # A forger raises the evaluation number: unsigned, it would outrank every genuine copy to come.
    text = (INTEL / "automata_1025_tcb_info.json").read_bytes()
    forged = text.replace(b'"tcbEvaluationDataNumber":', b'"tcbEvaluationDataNumber":9', 1)
    assert forged != text
    pcs.tcb_info("tdx", "00806F050000", forged, TCB_SIGNING_CHAIN)
    later = OCTOBER + timedelta(days=2)
    served = _collateral(pcs, cache, later, authenticate=True).for_quote(COS_QUOTE)
    assert served["tcb_info"] == genuine["tcb_info"]
    assert cache.read("tdx-tcb-00806F050000.json") == text
