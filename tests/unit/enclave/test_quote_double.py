"""The end-to-end tests' quote double behind the real attesters: genuine quotes over the report data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclave._daemon.tsm import ConfigfsTsm, GramineAttester, TsmAttester
from enclave.attestation.dcap import verify_quote
from enclave.attestation.sgx import SgxVerifier
from enclave.attestation.tdx import TdxVerifier
from enclave.errors import EvidenceError
from testkit.dcap import NOW, Pki, collateral, level, qe_identity, signed, tcb_info
from testkit.quote_double import SGX_REGISTERS, TDX_REGISTERS, quote_double


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def test_tdx_quotes_from_the_configfs_double_bind_each_report_data(pki: Pki, tmp_path: Path) -> None:
    with quote_double(pki, tmp_path / "entry", "tdx") as double:
        attester = TsmAttester("tdx", tsm=ConfigfsTsm(entry=tmp_path / "entry"), rtmr_file=None)
        for _ in range(2):
            report_data = os.urandom(64)
            evidence = attester.collect(report_data)
            claims = TdxVerifier(trust_anchor=pki.root_der).verify(
                evidence, report_data=report_data, now=NOW, collateral=collateral(pki)
            )
            assert claims.details["tcb_status"] == "UpToDate"
            assert {name: claims.registers[name].hex() for name in TDX_REGISTERS} == TDX_REGISTERS
            assert claims.log_register is None  # RTMR3 all zero: the log is bound by the report data
        assert double.quotes == 2


def test_sgx_quotes_from_the_gramine_double_bind_the_report_data(pki: Pki, tmp_path: Path) -> None:
    sgx = collateral(
        pki,
        tcb_info=signed(pki, "tcbInfo", tcb_info([level(tdx=None)], id="SGX")),
        qe_identity=signed(pki, "enclaveIdentity", qe_identity([(4, "UpToDate")], id="QE", isvprodid=1)),
    )
    with quote_double(pki, tmp_path / "attestation", "sgx"):
        report_data = os.urandom(64)
        evidence = GramineAttester(tmp_path / "attestation").collect(report_data)
        claims = SgxVerifier(trust_anchor=pki.root_der).verify(
            evidence, report_data=report_data, now=NOW, collateral=sgx
        )
    assert claims.details["tcb_status"] == "UpToDate"
    assert {name: claims.registers[name].hex() for name in SGX_REGISTERS} == SGX_REGISTERS


def test_the_doubles_quotes_are_refused_under_the_pinned_intel_root(pki: Pki, tmp_path: Path) -> None:
    with quote_double(pki, tmp_path / "entry", "tdx"):
        evidence = TsmAttester("tdx", tsm=ConfigfsTsm(entry=tmp_path / "entry"), rtmr_file=None).collect(
            bytes(64)
        )
    with pytest.raises(EvidenceError, match="PCK certificate chain"):
        verify_quote(evidence.parts["quote"], now=NOW)
