"""The PCR-15 attack: a plain script on the borrower's machine extends the application PCR itself.

The borrower has root on a machine that did not boot the measured image (here: a
swtpm whose boot PCRs hold another kernel than the one the manifest approved).
The script is not the daemon: it extends PCR 15 itself with the digests the
genuine build produces, then enrols with the TPM's real EK and AK. Against a
manifest that pins the boot chain it is refused before any credential, so it
can never fetch the model; against one that says ``allow_unmeasured_os`` the
same script is admitted, which is why every tool says so out loud.

Skips where swtpm or tpm2-pytss is missing, unless ``CUSTOS_REQUIRE_TPM=1``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from custodian.enrolment import CredentialChallenge, Enrolled
from enclave._daemon.config import custodian_ca_der
from enclave._daemon.enrolment import certificate_request
from enclave._daemon.tpm_device import TpmAttester
from enclave.attestation import AttestedClaims, ReferenceValues, measurement
from enclave.attestation.manifest import UNMEASURED_OS_WARNING
from enclave.errors import ManifestError, PolicyError
from enclave.identity import generate_identity_key, public_key_der
from tests import boot_support, tpm_support
from tests.unit.custodian.harness import Custody, custody

start_swtpm = tpm_support.swtpm_fixture()
open_attester = tpm_support.attester_fixture()
OpenAttester = Callable[..., TpmAttester]
BOOT_PCRS = tuple(range(10))


async def _lend(
    c: Custody, boot_registers: dict[str, str], ek_roots: bytes, *, allow_unmeasured_os: bool
) -> str:
    await c.upload("m", b"\0" * 3000)
    manifest = ReferenceValues(
        platform="tpm",
        allow_simulation=False,
        custodian_ca_sha256=measurement.custodian_ca_sha256(custodian_ca_der(c.tls_ca.pem)),
        code_sha384=measurement.code_sha384().hex(),
        registers=boot_registers,
        allow_unmeasured_os=allow_unmeasured_os,
        tpm_ek_roots=ek_roots.decode(),
    )
    return await c.deployments.create(
        "d", model="m", manifest=manifest.to_toml(), offline_grace_seconds=30, lease_size=10
    )


async def _script_enrols(c: Custody, token: str, tpm: TpmAttester) -> Enrolled:
    """What the attacker's script does: extend PCR 15 by hand, quote it, enrol, activate the credential."""
    log = (measurement.code_event(), measurement.config_event(custodian_ca_der(c.tls_ca.pem)))
    for event in log:
        tpm.extend(event.digests())
    key = generate_identity_key()
    nonce, _ = await c.enrolment.challenge("d")
    claims = AttestedClaims(
        nonce=nonce, public_key=public_key_der(key), deployment="d", platform="tpm", purpose="enrol", log=log
    )
    reply = await c.enrolment.enrol(
        "d",
        join_token=token,
        evidence=tpm.collect(claims.report_data()).to_bytes(),
        claims=claims.to_bytes(),
        csr=certificate_request(key),
        tpm_ek_public=tpm.ek_public,
        tpm_ek_certificate=tpm.ek_certificate or b"",
    )
    assert isinstance(reply, CredentialChallenge)
    enrolled = await c.enrolment.activate(
        reply.challenge_id, tpm.activate_credential(reply.credential_blob, reply.encrypted_secret)
    )
    assert isinstance(enrolled, Enrolled)
    return enrolled


def _genuine_boot_registers(
    start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> dict[str, str]:
    """The manifest's boot PCRs: read from a TPM that booted the approved image."""
    genuine = start_swtpm()
    boot_support.measure_boot(genuine.tcti, boot_support.classic_boot())
    values = open_attester(genuine, quote_pcrs=BOOT_PCRS).read_pcrs(BOOT_PCRS, bank="sha384")
    return {f"pcr.sha384.{i}": v.hex() for i, v in values.items()}


def _attackers_tpm(start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester) -> TpmAttester:
    """The same manufactured TPM (its EK certificate is trusted), on a machine that booted another kernel."""
    booted = start_swtpm()
    boot_support.measure_boot(booted.tcti, boot_support.classic_boot(kernel=b"vmlinuz with a root shell"))
    return open_attester(booted, quote_pcrs=BOOT_PCRS)


def test_a_script_extending_pcr_15_on_another_boot_is_refused_and_gets_no_model(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    registers = _genuine_boot_registers(start_swtpm, open_attester)
    attacker = _attackers_tpm(start_swtpm, open_attester)
    ek_roots = start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await _lend(c, registers, ek_roots, allow_unmeasured_os=False)
            with pytest.raises(PolicyError, match=r"register pcr\.sha384\.9 is"):
                await _script_enrols(c, token, attacker)
            async with c.ledger.transaction() as tx:
                assert await tx.instances("d") == []  # no instance, no client certificate: no FetchModel

    asyncio.run(scenario())


def test_a_manifest_pinning_only_the_firmware_pcrs_cannot_be_lent_under(
    tmp_path: Path, start_swtpm: tpm_support.StartSwtpm, open_attester: OpenAttester
) -> None:
    # PCRs 0-7 stop at the boot loader: the attacker's kernel (PCR 9) would pass them.
    firmware_only = {
        k: v for k, v in _genuine_boot_registers(start_swtpm, open_attester).items() if int(k[11:]) < 8
    }
    ek_roots = start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            with pytest.raises(ManifestError, match="boot chain up to the OS"):
                await _lend(c, firmware_only, ek_roots, allow_unmeasured_os=False)

    asyncio.run(scenario())


def test_with_allow_unmeasured_os_the_same_script_is_admitted_and_the_tools_say_so(
    tmp_path: Path,
    start_swtpm: tpm_support.StartSwtpm,
    open_attester: OpenAttester,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attacker = _attackers_tpm(start_swtpm, open_attester)
    ek_roots = start_swtpm.ca.root_pem + start_swtpm.ca.intermediate_pem

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await _lend(c, {}, ek_roots, allow_unmeasured_os=True)
            manifest = ReferenceValues.from_toml(await c.deployments.manifest("d"))
            assert UNMEASURED_OS_WARNING in manifest.warnings
            with caplog.at_level(logging.WARNING):
                enrolled = await _script_enrols(c, token, attacker)
            assert enrolled.instance_id
            assert UNMEASURED_OS_WARNING in caplog.text

    asyncio.run(scenario())
