"""The SEV-SNP attester attaching AMD KDS certificates to a report that came without them.

The report is a recorded one (gosev_attestation.bin) replayed through a
configfs-tsm entry: its REPORT_DATA is the one it was made with, not ours, so
the evidence is verified here against that REPORT_DATA; an end-to-end
enrolment with it cannot be made honestly (it binds no fresh nonce).
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave._daemon.cli import main
from enclave._daemon.tsm import ConfigfsTsm, TsmAttester
from enclave.attestation.sev_snp import SevSnpVerifier
from enclave.attestation.sev_snp_report import parse_report
from enclave.collateral import _http
from enclave.collateral.amd_kds import AmdKds
from enclave.collateral.cache import CollateralCache
from tests.unit.collateral.fake_kds import GOSEV_CHAIN, GOSEV_REPORT, GOSEV_VCEK, FakeKds, serving
from tests.unit.enclave.fake_custodian import CertAuthority

NOW = datetime.datetime(2026, 11, 21, tzinfo=datetime.UTC)


def _fetch(url: str) -> _http.Response:
    return _http.get(url, attempts=1, timeout=30)


@pytest.fixture
def kds() -> Iterator[FakeKds]:
    with serving(FakeKds.recorded()) as fake:
        yield fake


def _attester(tmp_path: Path, kds: FakeKds) -> TsmAttester:
    entry = tmp_path / "entry0"
    entry.mkdir()
    shutil.copy(GOSEV_REPORT, entry / "outblob")
    client = AmdKds(kds.url, cache=CollateralCache(None), fetch=_fetch)
    return TsmAttester("sev-snp", tsm=ConfigfsTsm(entry=entry), amd_kds=client)


def test_a_report_without_certificates_leaves_with_the_vcek_and_chain_from_kds(
    tmp_path: Path, kds: FakeKds
) -> None:
    attester = _attester(tmp_path, kds)
    evidence = attester.collect(os.urandom(64))
    assert evidence.parts["vcek"] == GOSEV_VCEK.read_bytes()
    assert evidence.parts["cert_chain"] == GOSEV_CHAIN.read_bytes()
    assert "crl" not in evidence.parts  # the local KDS has no CRL: it is left to the relying party
    recorded = parse_report(evidence.parts["report"]).report_data
    claims = SevSnpVerifier().verify(evidence, report_data=recorded, now=NOW)
    assert claims.details["product"] == "Milan"
    asked = len(kds.requests)
    attester.collect(os.urandom(64))
    assert kds.requests[asked:] == ["/vcek/v1/Milan/crl"]  # VCEK and chain kept in memory


def test_kds_unreachable_leaves_the_evidence_as_the_report_made_it(tmp_path: Path, kds: FakeKds) -> None:
    attester = _attester(tmp_path, kds)
    kds.down()
    evidence = attester.collect(os.urandom(64))
    assert set(evidence.parts) == {"report"}


@pytest.mark.parametrize(
    ("platform", "url", "message"),
    [
        ("tdx", "http://127.0.0.1:1", "--amd-kds is for --platform sev-snp"),
        ("sev-snp", "ftp://kds.example", "--amd-kds: not an http(s) URL"),
    ],
    ids=["other-platform", "not-http"],
)
def test_enclave_serve_refuses_a_misplaced_or_bad_kds_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], platform: str, url: str, message: str
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CertAuthority("custodian test CA").pem)
    argv = ["serve", "--custodian", "127.0.0.1:1", "--custodian-ca", str(ca), "--deployment", "d"]
    argv += ["--token", "t", "--listen", "127.0.0.1:0", "--platform", platform, "--amd-kds", url]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
