"""The AK CA in a running custodian: created private, kept apart from the enclave CA, named by
tpm deployments' end-user manifests, and added to a data directory made before it existed."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from cryptography import x509

from custodian.authority import CertificateAuthority
from enclave.attestation import ReferenceValues, measurement
from protos import custos_pb2 as pb
from tests.integration.custodian.harness import Running, onnx_model, running
from tests.unit.custodian.fake_enclave import ca_der


def _tpm_manifest(custodian_ca_pem: bytes) -> str:
    return ReferenceValues(
        platform="tpm",
        allow_simulation=False,
        custodian_ca_sha256=hashlib.sha256(ca_der(custodian_ca_pem)).hexdigest(),
        code_sha384=measurement.code_sha384().hex(),
        registers={f"pcr.sha384.{i}": "00" * 48 for i in range(10)},
        tpm_ek_roots=custodian_ca_pem.decode(),
    ).to_toml()


async def _end_user_ak_roots(r: Running, name: str) -> str:
    async def upload() -> AsyncIterator[pb.ModelUpload]:
        yield pb.ModelUpload(name=f"{name}-model")
        yield pb.ModelUpload(data=onnx_model(3000))

    await r.admin.AddModel(upload())
    await r.admin.CreateDeployment(
        pb.CreateDeploymentRequest(
            name=name, model=f"{name}-model", manifest=_tpm_manifest(r.ca_pem), lease_size=10
        )
    )
    reply = await r.admin.GetDeploymentManifest(pb.DeploymentManifestRequest(name=name))
    return ReferenceValues.from_toml(reply.manifest).tpm_ak_roots


def test_the_ak_ca_is_its_own_ca_and_tpm_end_users_trust_it(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def scenario() -> None:
        async with running(tmp_path) as r:
            assert stat.S_IMODE((data / "ak-ca.key").stat().st_mode) == 0o600
            ak_ca = (data / "ak-ca.pem").read_bytes()
            enclave_ca = (data / "enclave-ca.pem").read_bytes()
            assert x509.load_pem_x509_certificate(ak_ca).public_key() != (
                x509.load_pem_x509_certificate(enclave_ca).public_key()
            )
            assert await _end_user_ak_roots(r, "t") == ak_ca.decode()

    asyncio.run(scenario())


def test_a_data_directory_without_an_ak_ca_gets_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    # A data directory from before the AK CA: its other CAs are there already.
    for stem in ("custodian-ca", "enclave-ca"):
        CertificateAuthority.load_or_create(data, stem, stem, now=datetime.datetime.now(datetime.UTC))
    enclave_ca = (data / "enclave-ca.pem").read_bytes()

    async def scenario() -> None:
        async with running(tmp_path) as r:
            assert stat.S_IMODE((data / "ak-ca.key").stat().st_mode) == 0o600
            assert (data / "enclave-ca.pem").read_bytes() == enclave_ca
            assert await _end_user_ak_roots(r, "t") == (data / "ak-ca.pem").read_text()

    asyncio.run(scenario())
