"""A zeroized TPM enclave enrols again in the same TPM boot: its log goes on from the earlier instance's.

The application PCR cannot be reset, so the new instance's entries follow the
old one's; the custodian replays the whole log to the quoted PCR and checks
the current instance's entries (key, deployment, code, configuration).

Skips where swtpm or tpm2-pytss is missing, unless ``CUSTOS_REQUIRE_TPM=1``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from custodian.enrolment import CredentialChallenge, Enrolled
from enclave._daemon.config import custodian_ca_der
from enclave._daemon.enrolment import certificate_request
from enclave._daemon.errors import TpmDeviceError
from enclave._daemon.measured import MeasuredIdentity
from enclave._daemon.tpm_device import TpmAttester
from enclave.attestation import AttestedClaims, ReferenceValues, measurement
from enclave.errors import BindingError
from tests import tpm_support
from tests.unit.custodian.harness import Custody, custody

start_swtpm = tpm_support.swtpm_fixture()
open_attester = tpm_support.attester_fixture()
OpenAttester = Callable[..., TpmAttester]
BOOT_PCRS = (*range(10), 11)


async def _lend(c: Custody, ek_roots: bytes) -> str:
    await c.upload("m", b"\0" * 3000)
    manifest = ReferenceValues(
        platform="tpm",
        allow_simulation=False,
        custodian_ca_sha256=measurement.custodian_ca_sha256(custodian_ca_der(c.tls_ca.pem)),
        code_sha384=measurement.code_sha384().hex(),
        registers={f"pcr.sha384.{i}": "00" * 48 for i in BOOT_PCRS},  # swtpm: no firmware
        tpm_ek_roots=ek_roots.decode(),
    )
    return await c.deployments.create(
        "d", model="m", manifest=manifest.to_toml(), offline_grace_seconds=30, lease_size=10
    )


def _started(c: Custody, identity: MeasuredIdentity) -> MeasuredIdentity:
    """What the daemon measures before it enrols."""
    identity.measure(measurement.code_event())
    identity.measure(measurement.config_event(custodian_ca_der(c.tls_ca.pem)))
    return identity


async def _enrol(
    c: Custody, token: str, identity: MeasuredIdentity, *, claims: AttestedClaims | None = None
) -> Enrolled:
    tpm = identity.attester
    assert isinstance(tpm, TpmAttester)
    nonce, _ = await c.enrolment.challenge("d")
    evidence, claims_bytes = identity.attest("enrol", nonce)
    if claims is not None:  # what a tampering enclave would send instead, with a real quote over it
        claims_bytes = replace(claims, nonce=nonce).to_bytes()
        evidence = tpm.collect(AttestedClaims.from_bytes(claims_bytes).report_data()).to_bytes()
    reply = await c.enrolment.enrol(
        "d",
        join_token=token,
        evidence=evidence,
        claims=claims_bytes,
        csr=certificate_request(identity.key),
        tpm_ek_public=tpm.ek_public,
        tpm_ek_certificate=tpm.ek_certificate or b"",
    )
    assert isinstance(reply, CredentialChallenge)
    secret = tpm.activate_credential(reply.credential_blob, reply.encrypted_secret)
    enrolled = await c.enrolment.activate(reply.challenge_id, secret)
    assert isinstance(enrolled, Enrolled)
    return enrolled


def test_a_zeroized_instance_enrols_again_in_the_same_tpm_boot(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    tpm = start_swtpm()
    ek_roots = start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await _lend(c, ek_roots)
            first_attester = open_attester(tpm, quote_pcrs=BOOT_PCRS)
            first = _started(c, MeasuredIdentity(first_attester, "d"))
            one = await _enrol(c, token, first)
            first.measure(measurement.model_event(hashlib.sha384(b"\0" * 3000).digest()))
            first.attest("tls", b"")  # the model is in the PCR once its TLS certificate's evidence is
            first_attester.close()  # zeroized: key, model and attester dropped

            second = _started(c, first.successor(open_attester(tpm, quote_pcrs=BOOT_PCRS)))
            two = await _enrol(c, token, second)
            assert one.instance_id != two.instance_id
            kinds = [e.kind for e in second.log]
            assert kinds == ["instance", "code", "config", "model", "instance", "code", "config"]

    asyncio.run(scenario())


def test_the_earlier_instances_entries_cannot_be_left_out(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    tpm = start_swtpm()
    ek_roots = start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await _lend(c, ek_roots)
            first_attester = open_attester(tpm, quote_pcrs=BOOT_PCRS)
            first = _started(c, MeasuredIdentity(first_attester, "d"))
            await _enrol(c, token, first)
            first_attester.close()
            second = _started(c, first.successor(open_attester(tpm, quote_pcrs=BOOT_PCRS)))
            honest = AttestedClaims.from_bytes(second.attest("enrol", b"\0" * 32)[1])
            current = honest.instance_log()
            # Only the current instance's entries: they do not replay to the quoted PCR.
            with pytest.raises(BindingError, match="does not replay"):
                await _enrol(c, token, second, claims=replace(honest, log=current))
            # Without the current instance's opening entry, it does not replay either.
            with pytest.raises(BindingError, match="does not replay"):
                await _enrol(c, token, second, claims=replace(honest, log=honest.log[: -len(current)]))

    asyncio.run(scenario())


def test_a_pcr_extended_by_something_else_between_instances_is_refused_by_the_attester(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    tpm = start_swtpm()
    first_attester = open_attester(tpm)
    first = MeasuredIdentity(first_attester, "d")
    first.measure(measurement.code_event())
    first.attest("enrol", b"\0" * 32)
    first_attester.extend(measurement.model_event(b"\2" * 48).digests())  # not in any log
    second = first.successor(open_attester(tpm))
    with pytest.raises(TpmDeviceError, match="holds more than the earlier instances' log"):
        second.attest("enrol", b"\0" * 32)
