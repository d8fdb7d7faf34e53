"""Enrolment on the tpm platform: the EK certificate and the credential round, against swtpm.

Skips where swtpm or tpm2-pytss is missing, unless ``CUSTOS_REQUIRE_TPM=1``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from custodian.enrolment import CredentialChallenge, Enrolled
from custodian.errors import RefusedError
from custodian.web.evidence_book import EvidenceBook
from enclave._daemon.config import custodian_ca_der
from enclave._daemon.enrolment import certificate_request
from enclave._daemon.errors import TpmDeviceError
from enclave._daemon.measured import MeasuredIdentity
from enclave._daemon.tpm_device import TpmAttester
from enclave.attestation import ReferenceValues, appraise, measurement
from enclave.attestation.tpm_ak import TCG_KP_AIK_CERTIFICATE, load_ak
from tests import tpm_support
from tests.unit.custodian.harness import Custody, custody, sample

start_swtpm = tpm_support.swtpm_fixture()
open_attester = tpm_support.attester_fixture()
OpenAttester = Callable[..., TpmAttester]


async def _lend(c: Custody, ek_roots: bytes) -> str:
    await c.upload("m", b"\0" * 3000)
    manifest = ReferenceValues(
        platform="tpm",
        allow_simulation=False,
        custodian_ca_sha256=measurement.custodian_ca_sha256(custodian_ca_der(c.tls_ca.pem)),
        code_sha384=measurement.code_sha384().hex(),
        allow_unmeasured_os=True,  # these tests are about the EK and the credential, not the boot chain
        tpm_ek_roots=ek_roots.decode(),
    )
    return await c.deployments.create(
        "d", model="m", manifest=manifest.to_toml(), offline_grace_seconds=30, lease_size=10
    )


def _measured(c: Custody, attester: TpmAttester) -> MeasuredIdentity:
    identity = MeasuredIdentity(attester, "d")
    identity.measure(measurement.code_event())
    identity.measure(measurement.config_event(custodian_ca_der(c.tls_ca.pem)))
    return identity


async def _enrol(c: Custody, token: str, identity: MeasuredIdentity, ek: TpmAttester) -> CredentialChallenge:
    """Enrol with ``identity``'s evidence and ``ek``'s EK (the same TPM, or not)."""
    nonce, _ = await c.enrolment.challenge("d")
    evidence, claims = identity.attest("enrol", nonce)
    reply = await c.enrolment.enrol(
        "d",
        join_token=token,
        evidence=evidence,
        claims=claims,
        csr=certificate_request(identity.key),
        tpm_ek_public=ek.ek_public,
        tpm_ek_certificate=ek.ek_certificate or b"",
    )
    assert isinstance(reply, CredentialChallenge)
    return reply


def _activate(attester: TpmAttester, challenge: CredentialChallenge) -> bytes:
    return attester.activate_credential(challenge.credential_blob, challenge.encrypted_secret)


async def _last_refusal(c: Custody) -> str:
    async with c.ledger.transaction() as tx:
        last = (await tx.audit_entries(last=1))[0]
    assert last.action == "enrol.refuse"
    return f"{last.detail['reason']}: {last.detail['detail']}"


def test_activated_credential_admits_the_enclave_and_certifies_its_ak(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    attester = open_attester()

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await _lend(c, start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem)
            identity = _measured(c, attester)
            challenge = await _enrol(c, token, identity, attester)
            with pytest.raises(RefusedError, match="not in the same TPM"):
                await c.enrolment.activate(challenge.challenge_id, b"\0" * 32)
            assert (await _last_refusal(c)).startswith("credential")
            with pytest.raises(RefusedError, match="already used"):
                await c.enrolment.activate(challenge.challenge_id, _activate(attester, challenge))

            challenge = await _enrol(c, token, identity, attester)
            secret = _activate(attester, challenge)
            enrolled = await c.enrolment.activate(challenge.challenge_id, secret)
            assert isinstance(enrolled, Enrolled)
            # Spent once, in any spelling of the same sealed bytes.
            for spelling in (challenge.challenge_id + "\n", challenge.challenge_id.rstrip("=")):
                with pytest.raises(RefusedError, match="unknown or was already used"):
                    await c.enrolment.activate(spelling, secret)
            ak_certificate = x509.load_pem_x509_certificate(enrolled.ak_certificate_pem)
            ak_certificate.verify_directly_issued_by(c.ak_ca.certificate)
            certified = ak_certificate.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )
            assert certified == load_ak(attester.ak_public).spki()
            usage = ak_certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert list(usage) == [TCG_KP_AIK_CERTIFICATE]
            attester.use_ak_certificate(enrolled.ak_certificate_pem)

            # End users trust the AK through the end-user manifest, which names the AK CA.
            end_user = ReferenceValues.from_toml(await c.deployments.manifest("d"))
            nonce = os.urandom(32)
            evidence, claims = identity.attest("enrol", nonce)
            appraisal = appraise(
                evidence,
                claims,
                end_user,
                now=c.clock(),
                nonce=nonce,
                public_key=identity.public_key_der,
                purpose="enrol",
                deployment="d",
                require_model=False,
            )
            assert appraisal.platform.details["ak_trust"] == "certificate"

    asyncio.run(scenario())


def test_an_ak_from_another_tpm_cannot_activate_the_credential(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    certified, other = open_attester(), open_attester(start_swtpm("blank"))

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await _lend(c, start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem)
            # The other TPM's AK signed the evidence; the EK and its certificate are the certified TPM's.
            challenge = await _enrol(c, token, _measured(c, other), certified)
            with pytest.raises(TpmDeviceError, match="not made for this TPM"):
                _activate(other, challenge)
            with pytest.raises(RefusedError, match="not in the same TPM"):
                await c.enrolment.activate(challenge.challenge_id, b"")

    asyncio.run(scenario())


def test_an_ek_certificate_outside_the_manifest_roots_is_refused(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    attester = open_attester()

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await _lend(c, c.tls_ca.pem)
            with pytest.raises(RefusedError, match="EK certificate is not trusted"):
                await _enrol(c, token, _measured(c, attester), attester)
            assert (await _last_refusal(c)).startswith("ek")

    asyncio.run(scenario())


def test_credential_challenges_are_sealed_and_stored_nowhere(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    """Issue 13 item 1: the table of pending credentials was a second global table to fill."""
    attester = open_attester()

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await _lend(c, start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem)
            identity = _measured(c, attester)
            first = await _enrol(c, token, identity, attester)
            second = await _enrol(c, token, identity, attester)
            altered = first.challenge_id[:-2] + ("A" if first.challenge_id[-2] != "A" else "B") + "="
            for garbage in (altered, "", "x" * 5000, "\u00e9t\u00e9"):
                with pytest.raises(RefusedError, match="unknown"):
                    await c.enrolment.activate(garbage, _activate(attester, first))
            c.clock.advance(c.config.nonce_ttl_seconds + 2)
            with pytest.raises(RefusedError, match="expired"):
                await c.enrolment.activate(second.challenge_id, _activate(attester, second))
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason="credential") == 5

    asyncio.run(scenario())


def test_the_evidence_of_an_activated_tpm_enclave_is_recorded_for_the_console(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    """Issue 16: tpm enclaves are admitted at activation; the console's evidence book hears of them then."""
    attester = open_attester()

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            book = EvidenceBook()
            c.enrolment.on_admitted = book.record
            token = await _lend(c, start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem)
            identity = _measured(c, attester)
            refused = await _enrol(c, token, identity, attester)
            with pytest.raises(RefusedError, match="not in the same TPM"):
                await c.enrolment.activate(refused.challenge_id, b"\0" * 32)

            nonce, _ = await c.enrolment.challenge("d")
            evidence, claims = identity.attest("enrol", nonce)
            challenge = await c.enrolment.enrol(
                "d",
                join_token=token,
                evidence=evidence,
                claims=claims,
                csr=certificate_request(identity.key),
                tpm_ek_public=attester.ek_public,
                tpm_ek_certificate=attester.ek_certificate or b"",
            )
            assert isinstance(challenge, CredentialChallenge)
            enrolled = await c.enrolment.activate(challenge.challenge_id, _activate(attester, challenge))
            recorded = book.get(enrolled.instance_id)
            assert recorded is not None
            assert (recorded.evidence, recorded.claims) == (evidence, claims)
            shown = recorded.to_json()
            assert shown["platform"] == "tpm"
            assert not shown["simulated"]
            assert shown["registers"], "the quoted PCRs"
            assert [e["kind"] for e in shown["log"]] == ["instance", "code", "config"]
            async with c.ledger.transaction() as tx:
                admitted = [i.instance_id for i in await tx.instances("d")]
            assert admitted == [enrolled.instance_id]  # the refused activation admitted nothing
            assert book.get("") is None

    asyncio.run(scenario())
