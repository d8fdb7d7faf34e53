"""configfs-tsm and Gramine attesters against directories shaped like the kernel's, holding real evidence."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave._daemon.tsm import ConfigfsTsm, GramineAttester, TsmAttester, snp_certificates
from enclave.attestation.sev_snp import SevSnpVerifier
from enclave.attestation.sev_snp_report import parse_report
from enclave.attestation.tdx import TdxVerifier
from enclave.errors import BindingError, EvidenceError

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
SNP_REPORT = VECTORS / "sev-snp" / "trustee_test-report.bin"


@pytest.fixture(autouse=True)
def _vectors_present() -> None:
    if not VECTORS.is_dir():
        pytest.fail(f"the attestation vectors are missing: expected {VECTORS}")


def _entry(tmp_path: Path, outblob: Path, auxblob: bytes | None = None) -> Path:
    entry = tmp_path / "report" / "entry0"
    entry.mkdir(parents=True)
    shutil.copy(outblob, entry / "outblob")
    if auxblob is not None:
        (entry / "auxblob").write_bytes(auxblob)
    (entry / "provider").write_text("fake_guest\n")
    return entry


def test_a_replayed_real_tdx_quote_does_not_bind_our_report_data(tmp_path: Path) -> None:
    entry = _entry(tmp_path, VECTORS / "tdx" / "dcapqvl_tdx_quote.bin")
    attester = TsmAttester("tdx", tsm=ConfigfsTsm(entry=entry), rtmr_file=None)
    report_data = os.urandom(64)
    evidence = attester.collect(report_data)
    assert (entry / "inblob").read_bytes() == report_data
    assert evidence.parts["quote"] == (entry / "outblob").read_bytes()
    with pytest.raises(BindingError, match="report data"):
        TdxVerifier().verify(evidence, report_data=report_data, now=datetime.datetime.now(datetime.UTC))


def _cert_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    header_size = 24 * (len(entries) + 1)
    table, blobs = b"", b""
    for guid, der in entries:
        table += (
            guid.bytes_le + (header_size + len(blobs)).to_bytes(4, "little") + len(der).to_bytes(4, "little")
        )
        blobs += der
    return table + bytes(24) + blobs


def _chain_ders() -> list[bytes]:
    pem = (VECTORS / "sev-snp" / "trustee_milan_ask_ark_asvk.pem").read_bytes()
    certs = x509.load_pem_x509_certificates(pem)
    wanted = [
        c
        for c in certs
        if c.subject.rfc4514_string().find("SEV-Milan") >= 0 or "ARK" in c.subject.rfc4514_string()
    ]
    return [c.public_bytes(serialization.Encoding.DER) for c in wanted]


def test_snp_report_and_certificate_table_become_verifiable_evidence(tmp_path: Path) -> None:
    vcek = (VECTORS / "sev-snp" / "trustee_test-vcek.der").read_bytes()
    ask, ark = _chain_ders()[:2]
    aux = _cert_table(
        [
            (uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"), vcek),
            (uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"), ask),
            (uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"), ark),
        ]
    )
    entry = _entry(tmp_path, SNP_REPORT, aux)
    attester = TsmAttester("sev-snp", tsm=ConfigfsTsm(entry=entry))
    evidence = attester.collect(bytes(64))
    assert evidence.parts["vcek"] == vcek
    # The real report carries its own report data: the evidence verifies with it, and not with ours.
    real_report_data = parse_report(SNP_REPORT.read_bytes()).report_data
    at = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    claims = SevSnpVerifier().verify(evidence, report_data=real_report_data, now=at)
    assert claims.platform == "sev-snp"
    with pytest.raises(BindingError):
        SevSnpVerifier().verify(evidence, report_data=os.urandom(64), now=at)


def test_certificate_table_entry_outside_the_blob_is_refused() -> None:
    bad = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le + (1000).to_bytes(4, "little") * 2
    with pytest.raises(EvidenceError, match="outside"):
        snp_certificates(bad + bytes(24))


def test_a_plain_directory_is_not_configfs(tmp_path: Path) -> None:
    root = tmp_path / "report"
    root.mkdir()
    with pytest.raises(EvidenceError, match="configfs-tsm entry"):
        ConfigfsTsm(root).report(bytes(64))


def test_tdx_log_events_extend_the_rtmr_file(tmp_path: Path) -> None:
    rtmr = tmp_path / "rtmr3:sha384"
    rtmr.write_bytes(b"")
    attester = TsmAttester("tdx", tsm=ConfigfsTsm(entry=tmp_path), rtmr_file=rtmr)
    digest = hashlib.sha384(b"event").digest()
    attester.extend({"sha384": digest})
    assert rtmr.read_bytes() == digest


def test_gramine_quote(tmp_path: Path) -> None:
    quote = (VECTORS / "sgx" / "dcapqvl_sgx_quote.bin").read_bytes()
    (tmp_path / "quote").write_bytes(quote)
    (tmp_path / "user_report_data").write_bytes(b"")
    evidence = GramineAttester(tmp_path).collect(bytes(range(64)))
    assert (tmp_path / "user_report_data").read_bytes() == bytes(range(64))
    assert evidence.parts["quote"] == quote


def test_tdx_and_sgx_evidence_carry_the_collateral_for_their_quote(tmp_path: Path) -> None:
    quote = (VECTORS / "tdx" / "dcapqvl_tdx_quote.bin").read_bytes()
    asked: list[bytes] = []

    def source(for_quote: bytes) -> dict[str, bytes]:
        asked.append(for_quote)
        return {"root_ca_crl": b"crl", "tcb_info": b"{}", "tcb_info_issuer_chain": b"pem"}

    entry = _entry(tmp_path, VECTORS / "tdx" / "dcapqvl_tdx_quote.bin")
    tdx = TsmAttester("tdx", tsm=ConfigfsTsm(entry=entry), rtmr_file=None, collateral=source)
    parts = tdx.collect(bytes(64)).parts
    assert asked == [quote]
    assert parts == {
        "quote": quote,
        "collateral.root_ca_crl": b"crl",
        "collateral.tcb_info": b"{}",
        "collateral.tcb_info_issuer_chain": b"pem",
    }
    gramine = tmp_path / "attestation"
    gramine.mkdir()
    (gramine / "quote").write_bytes(quote)
    assert GramineAttester(gramine, collateral=source).collect(bytes(64)).parts == parts


def test_without_collateral_the_quote_goes_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(_: bytes) -> dict[str, bytes]:
        raise EvidenceError("https://pcs.example/tdx/certification/v4/tcb: not reachable")

    entry = _entry(tmp_path, VECTORS / "tdx" / "dcapqvl_tdx_quote.bin")
    tdx = TsmAttester("tdx", tsm=ConfigfsTsm(entry=entry), rtmr_file=None, collateral=unavailable)
    with caplog.at_level("WARNING", logger="enclave._daemon.tsm"):
        assert list(tdx.collect(bytes(64)).parts) == ["quote"]
    assert "without Intel collateral: https://pcs.example" in caplog.text
