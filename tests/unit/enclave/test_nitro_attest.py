"""The Nitro attesters against doubles of the NSM device and of nitro-tpm-attest."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest

from enclave._daemon import nitro_attest
from enclave._daemon.errors import ConfigError
from enclave._daemon.measured import MeasuredIdentity, TeeOptions, attester_factory
from enclave.attestation import AttestedClaims, Evidence, nitro
from enclave.attestation.nitro_document import parse_document
from enclave.errors import EvidenceError
from testkit.nitro import ENCLAVE_PCRS, NitroPki, document, trusting_root
from testkit.nitro_doubles import NsmDouble, tpm_tool


@pytest.fixture(scope="module")
def pki() -> NitroPki:
    return NitroPki()


@pytest.fixture(autouse=True)
def _trusted(pki: NitroPki) -> Iterator[None]:
    with trusting_root(pki.root_sha256):
        yield


def _verify(platform: str, evidence: Evidence, report_data: bytes) -> None:
    claims = nitro.NitroVerifier(platform).verify(evidence, report_data=report_data, now=datetime.now(UTC))
    assert claims.report_data == report_data


def test_nsm_request_carries_the_report_data_as_the_nonce() -> None:
    request = cbor2.loads(nitro_attest.nsm_attestation_request(b"\x07" * 64))
    assert request == {"Attestation": {"user_data": None, "nonce": b"\x07" * 64, "public_key": None}}


def test_enclave_attester_collects_a_document_bound_to_the_report_data(pki: NitroPki) -> None:
    nsm = NsmDouble(pki.signer())
    attester = nitro_attest.NitroEnclaveAttester(nsm)
    report_data = os.urandom(64)
    evidence = attester.collect(report_data)
    assert evidence.platform == nitro.PLATFORM_ENCLAVE
    assert parse_document(evidence.part(nitro.PART_DOCUMENT)).nonce == report_data
    _verify(nitro.PLATFORM_ENCLAVE, evidence, report_data)
    assert nsm.requests == 1


def test_measured_identity_attests_through_the_nsm(pki: NitroPki) -> None:
    identity = MeasuredIdentity(nitro_attest.NitroEnclaveAttester(NsmDouble(pki.signer())), "demo")
    nonce = os.urandom(32)
    evidence, claims = identity.attest("attest", nonce)
    parsed = AttestedClaims.from_bytes(claims)
    _verify(nitro.PLATFORM_ENCLAVE, Evidence.from_bytes(evidence), parsed.report_data())


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (cbor2.dumps({"Error": "InternalError"}), "refused the attestation request: 'InternalError'"),
        (cbor2.dumps({"Attestation": {}}), "not an Attestation response"),
        (cbor2.dumps([1, 2]), "not an Attestation response"),
        (b"\xff\xff", "not CBOR"),
    ],
    ids=["error", "no-document", "list", "garbage"],
)
def test_nsm_answers_that_are_not_documents_are_named(response: bytes, message: str) -> None:
    attester = nitro_attest.NitroEnclaveAttester(lambda request: response)
    with pytest.raises(EvidenceError, match=message):
        attester.collect(bytes(64))


def test_a_document_for_another_nonce_is_not_handed_on(pki: NitroPki) -> None:
    """A device (or whoever stands in for it) that replays an earlier document is caught at once."""
    earlier = document(pki.signer(), nonce=bytes(64))
    attester = nitro_attest.NitroEnclaveAttester(NsmDouble(pki.signer(), replay=earlier))
    with pytest.raises(EvidenceError, match="does not carry the nonce"):
        attester.collect(b"\x01" * 64)


def test_a_nitro_tpm_document_is_not_nitro_enclave_evidence(pki: NitroPki) -> None:
    tpm_document = document(pki.signer(), tpm=True, nonce=bytes(64))
    attester = nitro_attest.NitroEnclaveAttester(
        lambda request: cbor2.dumps({"Attestation": {"document": tpm_document}})
    )
    with pytest.raises(EvidenceError, match="from nitro-tpm, not nitro-enclave"):
        attester.collect(bytes(64))


def test_report_data_must_be_64_bytes(pki: NitroPki) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        nitro_attest.NitroEnclaveAttester(NsmDouble(pki.signer())).collect(bytes(32))


def test_the_nsm_device_that_is_not_one_is_named(tmp_path: Path) -> None:
    not_a_device = tmp_path / "nsm"
    not_a_device.write_bytes(b"")
    with pytest.raises(EvidenceError, match=r"NSM request on .* failed"):
        nitro_attest.NsmDevice(not_a_device)(nitro_attest.nsm_attestation_request(bytes(64)))
    with pytest.raises(ConfigError, match="cannot open the Nitro Secure Module"):
        nitro_attest.NsmDevice(tmp_path / "absent")(b"")
    with pytest.raises(ConfigError, match="does not exist"):
        nitro_attest.open_nitro("nitro-enclave", nsm_device=tmp_path / "absent")


def test_tpm_attester_runs_the_tool_with_the_nonce(pki: NitroPki, tmp_path: Path) -> None:
    tool = tpm_tool(tmp_path / "bin", pki.to_pem())
    attester = attester_factory("nitro-tpm", tee=TeeOptions(nitro_tpm_attest=str(tool)))()
    report_data = os.urandom(64)
    evidence = attester.collect(report_data)
    assert evidence.platform == nitro.PLATFORM_TPM
    assert parse_document(evidence.part(nitro.PART_DOCUMENT)).is_tpm
    _verify(nitro.PLATFORM_TPM, evidence, report_data)


def test_tpm_tool_replaying_a_document_is_caught(pki: NitroPki, tmp_path: Path) -> None:
    replay = document(pki.signer(), tpm=True, nonce=bytes(64))
    tool = tpm_tool(tmp_path / "bin", pki.to_pem(), replay=replay)
    with pytest.raises(EvidenceError, match="does not carry the nonce"):
        nitro_attest.NitroTpmAttester(str(tool)).collect(b"\x02" * 64)


def test_a_failing_tool_is_named_with_its_message(tmp_path: Path) -> None:
    tool = tmp_path / "nitro-tpm-attest"
    tool.write_text("#!/bin/sh\necho 'Error: TPM device not found' >&2\nexit 1\n")
    tool.chmod(0o755)
    with pytest.raises(EvidenceError, match=r"failed \(1\): Error: TPM device not found"):
        nitro_attest.NitroTpmAttester(str(tool)).collect(bytes(64))


def test_a_tool_printing_garbage_is_refused(tmp_path: Path) -> None:
    tool = tmp_path / "nitro-tpm-attest"
    tool.write_text("#!/bin/sh\necho hello\n")
    tool.chmod(0o755)
    with pytest.raises(EvidenceError, match="Nitro attestation document"):
        nitro_attest.NitroTpmAttester(str(tool)).collect(bytes(64))


def test_a_missing_tool_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="aws-nitro-tpm-tools"):
        nitro_attest.NitroTpmAttester(str(tmp_path / "nitro-tpm-attest"))


def test_enclave_pcrs_of_the_double_are_its_documents(pki: NitroPki) -> None:
    evidence = nitro_attest.NitroEnclaveAttester(NsmDouble(pki.signer())).collect(bytes(64))
    pcrs = parse_document(evidence.part(nitro.PART_DOCUMENT)).pcrs
    assert {i: v.hex() for i, v in pcrs.items()} == ENCLAVE_PCRS
