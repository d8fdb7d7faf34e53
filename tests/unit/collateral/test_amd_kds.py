"""The AMD KDS client against a local KDS of recorded documents: fetch, cache, refresh, outage, refusal."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from enclave.attestation import Evidence
from enclave.attestation.sev_snp import verify_report
from enclave.attestation.sev_snp_certs import load_certificates
from enclave.attestation.sev_snp_report import Product, SigningKey, TcbVersion, parse_report
from enclave.collateral import _http
from enclave.collateral._http import CollateralServiceError
from enclave.collateral.amd_kds import AmdKds, CacheFallback, product_from_cpuid, vcek_query
from enclave.collateral.cache import MAX_DOCUMENT_BYTES, CollateralCache
from enclave.errors import EvidenceError
from tests.unit.collateral.fake_kds import (
    GOSEV_CHAIN,
    GOSEV_CHAIN_NAME,
    GOSEV_REPORT,
    GOSEV_VCEK,
    GOSEV_VCEK_NAME,
    GOSEV_VCEK_PATH,
    VECTORS,
    FakeKds,
    serving,
)
from tests.unit.enclave.test_sev_snp_crl import DAY, _crl
from tests.unit.enclave.test_sev_snp_synthetic import NOW, _fake, _pem, _report

GOSEV_NOW = datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC)


def _fetch(url: str) -> _http.Response:
    return _http.get(url, attempts=2, timeout=30, sleep=lambda _: None)


@pytest.fixture
def kds() -> Iterator[FakeKds]:
    with serving(FakeKds.recorded()) as fake:
        yield fake


def _client(kds: FakeKds, cache: Path | CollateralCache | None = None, **kw: object) -> AmdKds:
    if isinstance(cache, Path):
        cache = CollateralCache(cache)
    return AmdKds(kds.url, cache=cache, fetch=_fetch, **kw)  # type: ignore[arg-type]


def _report_only(report: bytes) -> Evidence:
    return Evidence(platform="sev-snp", parts={"report": report})


def test_a_report_without_certificates_gets_its_real_vcek_and_chain_and_verifies(kds: FakeKds) -> None:
    report = GOSEV_REPORT.read_bytes()
    found = _client(kds).collateral_for(_report_only(report), require_crl=False)
    assert found["vcek"] == GOSEV_VCEK.read_bytes()
    assert found["cert_chain"] == GOSEV_CHAIN.read_bytes()
    assert kds.requests[:2] == [GOSEV_VCEK_PATH, "/vcek/v1/Milan/cert_chain"]
    verified = verify_report(report, found["vcek"], found["cert_chain"], now=GOSEV_NOW)
    assert verified.product is Product.MILAN


def test_what_the_evidence_carries_is_not_fetched(kds: FakeKds) -> None:
    evidence = Evidence(
        platform="sev-snp",
        parts={
            "report": GOSEV_REPORT.read_bytes(),
            "vcek": GOSEV_VCEK.read_bytes(),
            "cert_chain": GOSEV_CHAIN.read_bytes(),
        },
    )
    assert _client(kds).collateral_for(evidence, require_crl=False) == {}
    assert kds.requests == ["/vcek/v1/Milan/crl"]


def test_cached_documents_are_served_without_asking_and_while_kds_is_down(
    kds: FakeKds, tmp_path: Path
) -> None:
    report = _report_only(GOSEV_REPORT.read_bytes())
    first = _client(kds, tmp_path).collateral_for(report, require_crl=False)
    asked = len(kds.requests)
    again = _client(kds, tmp_path).collateral_for(report, require_crl=False)
    assert again == first
    assert kds.requests[asked:] == ["/vcek/v1/Milan/crl"]  # only the CRL, which KDS lacks here
    kds.down()
    assert _client(kds, tmp_path).collateral_for(report, require_crl=False) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [GOSEV_CHAIN_NAME, GOSEV_VCEK_NAME]
    assert (tmp_path / GOSEV_VCEK_NAME).read_bytes() == GOSEV_VCEK.read_bytes()
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in tmp_path.iterdir())


def test_kds_down_and_nothing_cached_is_an_error_naming_the_url(kds: FakeKds, tmp_path: Path) -> None:
    kds.down()
    with pytest.raises(CollateralServiceError, match=r"/vcek/v1/Milan/[0-9a-f]{128}\?blSPL=2.*not reachable"):
        _client(kds, tmp_path).collateral_for(_report_only(GOSEV_REPORT.read_bytes()), require_crl=False)


def test_a_chip_kds_does_not_know_is_refused(kds: FakeKds) -> None:
    other_chip = bytearray(GOSEV_REPORT.read_bytes())
    other_chip[0x1A0] ^= 1
    with pytest.raises(CollateralServiceError, match="HTTP 404") as refused:
        _client(kds).collateral_for(_report_only(bytes(other_chip)), require_crl=False)
    assert refused.value.status == 404
    # a version 2 report names no product: Milan, then Genoa, were asked
    assert [r.split("/")[3] for r in kds.requests] == ["Milan", "Genoa"]


def test_a_vcek_for_another_chip_or_tcb_is_refused_and_not_cached(kds: FakeKds, tmp_path: Path) -> None:
    kds.documents[GOSEV_VCEK_PATH] = (VECTORS / "trustee_test-vcek.der").read_bytes()
    with pytest.raises(EvidenceError, match=r"/vcek/v1/Milan/\w+\?.*: not the VCEK of this chip at this TCB"):
        _client(kds, tmp_path).collateral_for(_report_only(GOSEV_REPORT.read_bytes()), require_crl=False)
    assert not (tmp_path / GOSEV_VCEK_NAME).exists()


def test_a_cached_document_that_fails_its_check_is_fetched_again_and_replaced(
    kds: FakeKds, tmp_path: Path
) -> None:
    (tmp_path / GOSEV_VCEK_NAME).write_bytes((VECTORS / "trustee_test-vcek.der").read_bytes())
    (tmp_path / GOSEV_CHAIN_NAME).write_bytes(_fake().chain)  # under an ARK that is not pinned
    found = _client(kds, tmp_path).collateral_for(_report_only(GOSEV_REPORT.read_bytes()), require_crl=False)
    assert (found["vcek"], found["cert_chain"]) == (GOSEV_VCEK.read_bytes(), GOSEV_CHAIN.read_bytes())
    assert kds.requests[:2] == [GOSEV_VCEK_PATH, "/vcek/v1/Milan/cert_chain"]
    assert (tmp_path / GOSEV_VCEK_NAME).read_bytes() == GOSEV_VCEK.read_bytes()
    assert (tmp_path / GOSEV_CHAIN_NAME).read_bytes() == GOSEV_CHAIN.read_bytes()


def test_a_vcek_kds_sends_as_pem_is_served_and_cached_as_der(kds: FakeKds, tmp_path: Path) -> None:
    kds.documents[GOSEV_VCEK_PATH] = _pem(load_certificates(GOSEV_VCEK.read_bytes(), "VCEK")[0])
    found = _client(kds, tmp_path).collateral_for(_report_only(GOSEV_REPORT.read_bytes()), require_crl=False)
    assert found["vcek"] == (tmp_path / GOSEV_VCEK_NAME).read_bytes() == GOSEV_VCEK.read_bytes()


@pytest.mark.parametrize(
    "cache",
    [
        pytest.param(lambda d: CollateralCache(d, read_only=True), id="read-only"),
        pytest.param(lambda d: _occupied(CollateralCache(d)), id="names-taken-by-directories"),
    ],
)
def test_a_cache_that_fails_does_not_turn_a_good_fetch_into_a_refusal(
    kds: FakeKds, tmp_path: Path, cache: Callable[[Path], CollateralCache], caplog: pytest.LogCaptureFixture
) -> None:
    found = _client(kds, cache(tmp_path)).collateral_for(
        _report_only(GOSEV_REPORT.read_bytes()), require_crl=False
    )
    assert (found["vcek"], found["cert_chain"]) == (GOSEV_VCEK.read_bytes(), GOSEV_CHAIN.read_bytes())
    assert f"AMD {GOSEV_VCEK_NAME} not cached" in caplog.text
    assert f"AMD {GOSEV_CHAIN_NAME} not cached" in caplog.text


def _occupied(cache: CollateralCache) -> CollateralCache:
    """A cache whose documents' names are directories: every read and write of them fails."""
    assert cache.directory is not None
    for name in (GOSEV_VCEK_NAME, GOSEV_CHAIN_NAME):
        (cache.directory / name).mkdir()
    return cache


def test_an_answer_over_the_cache_limit_is_refused_before_parsing_and_not_cached(tmp_path: Path) -> None:
    def huge(url: str) -> _http.Response:
        return _http.Response(body=b"-----BEGIN CERTIFICATE-----" + b"A" * MAX_DOCUMENT_BYTES)

    client = AmdKds("http://127.0.0.1:9", cache=CollateralCache(tmp_path), fetch=huge)
    with pytest.raises(
        CollateralServiceError, match=r"/vcek/v1/Milan/cert_chain: the answer exceeds 1048576 bytes"
    ):
        client.cert_chain(Product.MILAN)
    assert list(tmp_path.iterdir()) == []


def test_a_chain_under_an_unpinned_ark_is_refused(kds: FakeKds) -> None:
    kds.documents["/vcek/v1/Milan/cert_chain"] = _fake().chain
    with pytest.raises(EvidenceError, match=r"ARK-Milan \(sha256 [0-9a-f]{64}\) is not a trusted AMD root"):
        _client(kds).cert_chain(Product.MILAN)


def test_a_vlek_signed_report_must_carry_its_vlek(kds: FakeKds) -> None:
    fake = _fake(kind=SigningKey.VLEK)
    with pytest.raises(EvidenceError, match="must carry its VLEK"):
        _client(kds).collateral_for(_report_only(_report(fake)))
    assert kds.requests == []


def test_a_masked_chip_id_cannot_be_looked_up(kds: FakeKds) -> None:
    fake = _fake()
    with pytest.raises(EvidenceError, match="CHIP_ID is masked"):
        _client(kds).collateral_for(_report_only(_report(fake, chip_id=bytes(64))))


def test_turin_asks_with_fmc_first_and_an_8_byte_hwid() -> None:
    tcb = TcbVersion.decode(int.from_bytes(bytes([1, 2, 3, 4, 0, 0, 0, 5]), "little"), Product.TURIN)
    path, query = vcek_query(Product.TURIN, bytes(range(1, 65)), tcb)
    assert path == "/vcek/v1/Turin/0102030405060708"
    assert list(query.items()) == [
        ("fmcSPL", "1"),
        ("blSPL", "2"),
        ("teeSPL", "3"),
        ("snpSPL", "4"),
        ("ucodeSPL", "5"),
    ]


@pytest.mark.parametrize(
    ("cpuid", "product"),
    [
        ((0x19, 0x01), Product.MILAN),
        ((0x19, 0x11), Product.GENOA),
        ((0x19, 0xA0), Product.GENOA),
        ((0x1A, 0x02), Product.TURIN),
    ],
)
def test_a_version_3_report_names_its_product(cpuid: tuple[int, int], product: Product) -> None:
    fake = _fake()
    report = parse_report(_report(fake, version=3, cpuid=bytes([*cpuid, 1])))
    assert product_from_cpuid(report) is product


def test_an_unknown_cpu_family_is_refused() -> None:
    report = parse_report(_report(_fake(), version=3, cpuid=bytes([0x17, 0x31, 0])))
    with pytest.raises(EvidenceError, match="no known AMD product"):
        product_from_cpuid(report)


# -- the CRL, under a synthetic ARK (no AMD CRL is recorded in ../shared/vectors) --


class _Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture
def synthetic() -> Iterator[tuple[FakeKds, object]]:
    fake = _fake()
    kds = FakeKds({"/vcek/v1/Milan/cert_chain": fake.chain, "/vcek/v1/Milan/crl": _crl(fake)})
    with serving(kds):
        yield kds, fake


def test_the_crl_is_fetched_checked_cached_and_refreshed_halfway(
    synthetic: tuple[FakeKds, object], tmp_path: Path
) -> None:
    kds, fake = synthetic
    clock = _Clock(NOW)
    client = _client(kds, tmp_path, clock=clock, roots=fake.roots)  # type: ignore[attr-defined]
    first = client.crl(Product.MILAN)
    assert first == kds.documents["/vcek/v1/Milan/crl"]
    assert kds.requests == ["/vcek/v1/Milan/cert_chain", "/vcek/v1/Milan/crl"]
    clock.now = NOW + 2 * DAY  # before halfway (thisUpdate - 1 day .. nextUpdate + 7 days)
    assert client.crl(Product.MILAN) == first
    assert len(kds.requests) == 2
    newer = _crl(fake, this_update=NOW + 3 * DAY, next_update=NOW + 10 * DAY)  # type: ignore[arg-type]
    kds.documents["/vcek/v1/Milan/crl"] = newer
    clock.now = NOW + 4 * DAY
    assert client.crl(Product.MILAN) == newer
    assert kds.requests[-1] == "/vcek/v1/Milan/crl"


def test_kds_down_serves_the_cached_crl_and_says_so(
    synthetic: tuple[FakeKds, object], tmp_path: Path
) -> None:
    kds, fake = synthetic
    clock = _Clock(NOW)
    fallbacks: list[CacheFallback] = []
    client = _client(kds, tmp_path, clock=clock, roots=fake.roots, on_fallback=fallbacks.append)  # type: ignore[attr-defined]
    cached = client.crl(Product.MILAN)
    kds.down()
    clock.now = NOW + 5 * DAY
    assert client.crl(Product.MILAN) == cached
    assert [f.name for f in fallbacks] == ["amd-crl-Milan-vcek.der"]
    assert "not reachable" in fallbacks[0].error


def test_a_stale_or_forged_crl_from_kds_is_refused_and_not_cached(
    synthetic: tuple[FakeKds, object], tmp_path: Path
) -> None:
    kds, fake = synthetic
    kds.documents["/vcek/v1/Milan/crl"] = _crl(fake, this_update=NOW - 9 * DAY, next_update=NOW - DAY)  # type: ignore[arg-type]
    client = _client(kds, tmp_path, clock=_Clock(NOW), roots=fake.roots)  # type: ignore[attr-defined]
    with pytest.raises(EvidenceError, match="/vcek/v1/Milan/crl: AMD CRL is stale"):
        client.crl(Product.MILAN)
    assert not (tmp_path / "amd-crl-Milan-vcek.der").exists()


def test_the_crl_is_required_unless_the_evidence_carries_one(synthetic: tuple[FakeKds, object]) -> None:
    kds, fake = synthetic
    del kds.documents["/vcek/v1/Milan/crl"]
    parts = {"report": _report(fake), "vcek": _pem(fake.leaf), "cert_chain": fake.chain}  # type: ignore[attr-defined]
    client = _client(kds, clock=_Clock(NOW), roots=fake.roots)  # type: ignore[attr-defined]
    with pytest.raises(CollateralServiceError, match="HTTP 404"):
        client.collateral_for(Evidence(platform="sev-snp", parts=parts))
    carried = Evidence(platform="sev-snp", parts={**parts, "crl": _crl(fake)})  # type: ignore[arg-type]
    assert client.collateral_for(carried) == {}


def test_after_kds_was_unreachable_it_is_left_alone_for_the_quiet_period() -> None:
    asked: list[str] = []

    def unreachable(url: str) -> _http.Response:
        asked.append(url)
        raise CollateralServiceError(f"{url}: not reachable (refused)", url=url)

    clock = _Clock(NOW)
    client = AmdKds("http://127.0.0.1:9", fetch=unreachable, clock=clock, quiet_seconds=30)
    for _ in range(2):
        with pytest.raises(CollateralServiceError):
            client.cert_chain(Product.MILAN)
    assert len(asked) == 1
    clock.now = NOW + datetime.timedelta(seconds=31)
    with pytest.raises(CollateralServiceError, match="not reachable"):
        client.cert_chain(Product.MILAN)
    assert len(asked) == 2


def test_a_404_is_an_answer_not_an_outage(kds: FakeKds) -> None:
    client = _client(kds)
    for _ in range(2):
        with pytest.raises(CollateralServiceError, match="HTTP 404"):
            client.cert_chain(Product.GENOA)
    assert kds.requests == ["/vcek/v1/Genoa/cert_chain"] * 2
