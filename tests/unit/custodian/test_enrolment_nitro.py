"""Enrolment on the Nitro platforms: a bound document enrols; a recorded real one is refused for its nonce."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from datetime import timedelta
from pathlib import Path

import pytest

from enclave.attestation import Evidence, ReferenceValues, nitro
from enclave.errors import BindingError
from testkit.nitro import ENCLAVE_PCRS, NitroPki, document, registers, trusting_root
from tests.unit.custodian.fake_enclave import FakeEnclave, ca_der
from tests.unit.custodian.harness import Custody, custody, sample

VECTORS = Path(__file__).resolve().parents[3].parent / "shared" / "vectors"
RECORDED = VECTORS / "nitro/blocky_nitro_attestation.b64"


def _manifest(c: Custody, enclave: FakeEnclave, pcrs: dict[str, str]) -> str:
    return ReferenceValues(
        platform="nitro-enclave",
        allow_simulation=False,
        custodian_ca_sha256=hashlib.sha256(ca_der(c.tls_ca.pem)).hexdigest(),
        code_sha384=enclave.log[0].sha384.hex(),
        registers=pcrs,
    ).to_toml()


async def _deploy(c: Custody, enclave: FakeEnclave, pcrs: dict[str, str]) -> str:
    await c.upload("m", os.urandom(3000))
    return await c.deployments.create(
        "n", model="m", manifest=_manifest(c, enclave, pcrs), offline_grace_seconds=30, lease_size=100
    )


def test_a_bound_document_enrols(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            now = c.clock()  # the harness's clock, not the machine's
            pki = NitroPki(start=now - timedelta(minutes=5))
            enclave = FakeEnclave(c.tls_ca.pem, "n")
            token = await _deploy(c, enclave, registers(ENCLAVE_PCRS, (0, 1, 2)))
            nonce, _ = await c.enrolment.challenge("n")
            claims = enclave.claims(nonce, platform="nitro-enclave")
            raw = document(pki.signer(), nonce=claims.report_data(), timestamp=now)
            evidence = Evidence("nitro-enclave", {nitro.PART_DOCUMENT: raw}).to_bytes()
            request = enclave.enrol_request(nonce, token, claims=claims, evidence=evidence)
            with trusting_root(pki.root_sha256):
                enrolled = await c.enrolment.enrol(
                    "n", join_token=token, evidence=request.evidence, claims=request.claims, csr=request.csr
                )
            instance = await c.enrolment.authenticate(enrolled.instance_id, enclave.public_key)
            assert instance.platform == "nitro-enclave"

    asyncio.run(scenario())


def test_a_recorded_real_document_is_refused_for_its_nonce(tmp_path: Path) -> None:
    """AWS's own signature, the PCRs the manifest pins, and a nonce made for someone else."""
    recorded = base64.b64decode(RECORDED.read_bytes())
    image = ("pcr0", "pcr1", "pcr2")
    pcrs = {name: v.hex() for name, v in nitro.verify_document(recorded).registers().items() if name in image}

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            enclave = FakeEnclave(c.tls_ca.pem, "n")
            token = await _deploy(c, enclave, pcrs)
            nonce, _ = await c.enrolment.challenge("n")
            claims = enclave.claims(nonce, platform="nitro-enclave")
            evidence = Evidence("nitro-enclave", {nitro.PART_DOCUMENT: recorded}).to_bytes()
            request = enclave.enrol_request(nonce, token, claims=claims, evidence=evidence)
            with pytest.raises(BindingError, match="nonce is not the expected report data"):
                await c.enrolment.enrol(
                    "n", join_token=token, evidence=request.evidence, claims=request.claims, csr=request.csr
                )
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason="binding") == 1

    asyncio.run(scenario())
