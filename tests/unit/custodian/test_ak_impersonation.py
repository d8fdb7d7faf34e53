"""An enrolled instance's enclave certificate posing as a TPM AK (issue 12 §3), refused everywhere.

A sim instance enrols for real and gets its client certificate from the
custodian's enclave CA. It then forges tpm evidence quoted by its software key
(tests/unit/enclave/_forged_tpm.py) with that certificate as the "AK
certificate". End users appraising it against the tpm deployment's end-user
manifest refuse it (the manifest names the AK CA, and even one naming the
enclave CA, as older custodians wrote, refuses it), and so does the custodian
when the forger tries to enrol in the tpm deployment with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from custodian.deployments import Deployments
from custodian.enrolment import Enrolled
from enclave.attestation import AttestedClaims, ReferenceValues, appraise
from enclave.attestation.measurement import model_event
from enclave.attestation.tpm import TpmVerifier
from enclave.errors import EvidenceError
from tests.unit.custodian.fake_enclave import FakeEnclave, ca_der, csr_der
from tests.unit.custodian.harness import Custody, custody, sample
from tests.unit.enclave._forged_tpm import FORGED_AK_ENCODINGS, boot_registers, forged_evidence, forged_tpm
from tests.unit.enclave.test_tpm_marshal import AK_ATTRIBUTES, ECDSA, marshal_public

SENSITIVE_DATA_ORIGIN = 1 << 5

# What stops each encoding: a TPMT_PUBLIC claims the right attributes, so only the certificate's
# usage (clientAuth) gives it away; a bare key is refused before its certificate is looked at.
REFUSAL = {
    "tpmt_public": "clientAuth",
    "spki": "bare spki key",
    "pem": "bare spki key",
    "jwk": "bare jwk key",
}


async def _sim_instance(c: Custody) -> tuple[FakeEnclave, bytes]:
    """A genuinely enrolled sim instance and its client certificate (PEM) from the enclave CA."""
    token = await c.lend("sim")
    enclave = FakeEnclave(c.tls_ca.pem, "sim")
    nonce, _ = await c.enrolment.challenge("sim")
    request = enclave.enrol_request(nonce, token)
    enrolled = await c.enrolment.enrol(
        "sim", join_token=token, evidence=request.evidence, claims=request.claims, csr=request.csr
    )
    assert isinstance(enrolled, Enrolled)
    return enclave, enrolled.certificate_pem


async def _tpm_deployment(c: Custody, forger: FakeEnclave) -> tuple[str, bytes]:
    """A tpm deployment whose manifest the forged evidence meets in everything but AK trust."""
    record = await c.upload("tpm-model", os.urandom(3000))
    manifest = ReferenceValues(
        platform="tpm",
        allow_simulation=False,
        custodian_ca_sha256=hashlib.sha256(ca_der(c.tls_ca.pem)).hexdigest(),
        code_sha384=forger.log[0].sha384.hex(),
        registers=boot_registers(forged_tpm(forger.key, forger.claims(b""))),
        tpm_ek_roots=c.tls_ca.pem.decode(),
    )
    token = await c.deployments.create(
        "t", model="tpm-model", manifest=manifest.to_toml(), offline_grace_seconds=30, lease_size=10
    )
    return token, record.sha384


def _attest_claims(forger: FakeEnclave, model_sha384: bytes) -> AttestedClaims:
    return forger.claims(
        os.urandom(32),
        deployment="t",
        platform="tpm",
        purpose="attest",
        log=(*forger.log, model_event(model_sha384)),
    )


@pytest.mark.parametrize("encoding", FORGED_AK_ENCODINGS)
def test_enclave_certificate_as_ak_is_refused_by_the_end_user_manifest(tmp_path: Path, encoding: str) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            forger, certificate = await _sim_instance(c)
            _, model_sha384 = await _tpm_deployment(c, forger)
            end_user = ReferenceValues.from_toml(await c.deployments.manifest("t"))
            assert end_user.tpm_ak_roots == c.ak_ca.pem.decode()
            claims = _attest_claims(forger, model_sha384)
            evidence = forged_evidence(forger.key, claims, ak_encoding=encoding, ak_cert=certificate)

            # The forgery is sound in all but its AK: a verifier with no AK roots takes the quote.
            unrooted = TpmVerifier().verify(evidence, report_data=claims.report_data(), now=c.clock())
            assert unrooted.details["ak_trust"] == "none"

            # The manifest as issued today, and as a custodian naming its enclave CA issued it before.
            older = replace(end_user, tpm_ak_roots=c.enclave_ca.pem.decode())
            for reference in (end_user, older):
                with pytest.raises(EvidenceError, match=REFUSAL[encoding]):
                    appraise(
                        evidence.to_bytes(),
                        claims.to_bytes(),
                        reference,
                        now=c.clock(),
                        nonce=claims.nonce,
                        public_key=forger.public_key,
                        purpose="attest",
                        deployment="t",
                    )

    asyncio.run(scenario())


@pytest.mark.parametrize("encoding", ["spki", "jwk"])
def test_custodian_refuses_to_enrol_a_software_key_as_a_tpm_ak(tmp_path: Path, encoding: str) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            forger, certificate = await _sim_instance(c)
            token, _ = await _tpm_deployment(c, forger)
            nonce, _ = await c.enrolment.challenge("t")
            claims = forger.claims(nonce, deployment="t", platform="tpm")
            evidence = forged_evidence(forger.key, claims, ak_encoding=encoding, ak_cert=certificate)
            with pytest.raises(EvidenceError, match=f"bare {encoding} key"):
                await c.enrolment.enrol(
                    "t",
                    join_token=token,
                    evidence=evidence.to_bytes(),
                    claims=claims.to_bytes(),
                    csr=csr_der(forger.key),
                    tpm_ek_public=b"any EK",
                    tpm_ek_certificate=b"any EK certificate",
                )
            async with c.ledger.transaction() as tx:
                last = (await tx.audit_entries(last=1))[0]
                instances = await tx.instances("t")
            assert (last.action, last.detail["reason"]) == ("enrol.refuse", "evidence")
            assert instances == []
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason="evidence") == 1
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason="ek") == 0

    asyncio.run(scenario())


def test_custodian_refuses_an_ak_the_tpm_did_not_make(tmp_path: Path) -> None:
    """A restricted signing key without sensitiveDataOrigin was imported: its maker holds the
    private key and can sign any TPMS_ATTEST outside the TPM."""

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            forger, certificate = await _sim_instance(c)
            token, _ = await _tpm_deployment(c, forger)
            nonce, _ = await c.enrolment.challenge("t")
            claims = forger.claims(nonce, deployment="t", platform="tpm")
            forged = forged_evidence(forger.key, claims, ak_encoding="tpmt_public", ak_cert=certificate)
            imported = marshal_public(
                forger.key, attributes=AK_ATTRIBUTES & ~SENSITIVE_DATA_ORIGIN, scheme=ECDSA
            )
            evidence = replace(forged, parts={**forged.parts, "ak": imported})
            with pytest.raises(EvidenceError, match="missing: sensitiveDataOrigin"):
                await c.enrolment.enrol(
                    "t",
                    join_token=token,
                    evidence=evidence.to_bytes(),
                    claims=claims.to_bytes(),
                    csr=csr_der(forger.key),
                    tpm_ek_public=b"any EK",
                    tpm_ek_certificate=b"any EK certificate",
                )
            async with c.ledger.transaction() as tx:
                last = (await tx.audit_entries(last=1))[0]
            assert (last.action, last.detail["reason"]) == ("enrol.refuse", "evidence")

    asyncio.run(scenario())


def test_a_deployment_stored_naming_the_enclave_ca_is_shown_naming_the_ak_ca(tmp_path: Path) -> None:
    """Older custodians stored the enclave CA as a tpm deployment's ak_roots: the end-user manifest
    handed out now names the AK CA whatever was stored."""

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            await c.lend("sim")
            older = Deployments(
                c.ledger,
                c.config,
                c.bus,
                c.metrics,
                custodian_ca_sha256=c.tls_ca.sha256,
                ak_ca_pem=c.enclave_ca.pem,
            )
            await c.upload("m", os.urandom(3000))
            manifest = ReferenceValues.from_toml(await c.deployments.manifest("sim"))
            await older.create(
                "t",
                model="m",
                manifest=replace(
                    manifest,
                    platform="tpm",
                    allow_simulation=False,
                    registers={f"pcr.sha384.{i}": "00" * 48 for i in range(10)},
                ).to_toml(),
                offline_grace_seconds=30,
                lease_size=10,
            )
            async with c.ledger.transaction() as tx:
                stored = await tx.deployment("t")
            assert stored is not None
            assert ReferenceValues.from_toml(stored.manifest).tpm_ak_roots == c.enclave_ca.pem.decode()
            shown = ReferenceValues.from_toml(await c.deployments.manifest("t"))
            assert shown.tpm_ak_roots == c.ak_ca.pem.decode()
            assert replace(shown, tpm_ak_roots="") == replace(
                ReferenceValues.from_toml(stored.manifest), tpm_ak_roots=""
            )
            # Other platforms' manifests are handed out as stored.
            async with c.ledger.transaction() as tx:
                sim = await tx.deployment("sim")
            assert sim is not None
            assert await c.deployments.manifest("sim") == sim.manifest

    asyncio.run(scenario())
