"""The custodian fetching SEV-SNP collateral from AMD KDS at enrolment (a local KDS of recorded documents).

The recorded report (gosev_attestation.bin) cannot bind an enrolment's nonce,
and no ARK-signed CRL is recorded, so no SEV-SNP enclave is admitted here:
the tests show what the custodian fetched, cached, and which step refused.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from custodian.cli import main
from enclave.attestation import Evidence, ReferenceValues
from protos import custos_pb2 as pb
from tests.integration.custodian.harness import Running, onnx_model, running
from tests.unit.collateral.fake_kds import (
    GOSEV_CHAIN,
    GOSEV_CHAIN_NAME,
    GOSEV_REPORT,
    GOSEV_VCEK,
    GOSEV_VCEK_NAME,
    GOSEV_VCEK_PATH,
    FakeKds,
    serving,
)
from tests.unit.custodian.fake_enclave import FakeEnclave, ca_der


@pytest.fixture
def kds() -> Iterator[FakeKds]:
    with serving(FakeKds.recorded()) as fake:
        yield fake


async def _lend_sev_snp(r: Running) -> str:
    async def upload() -> Any:
        yield pb.ModelUpload(name="m")
        yield pb.ModelUpload(data=onnx_model(3000))

    await r.admin.AddModel(upload())
    manifest = ReferenceValues(
        platform="sev-snp",
        allow_simulation=False,
        custodian_ca_sha256=hashlib.sha256(ca_der(r.ca_pem)).hexdigest(),
        code_sha384="00" * 48,
        registers={"measurement": "00" * 48},
    ).to_toml()
    created = await r.admin.CreateDeployment(
        pb.CreateDeploymentRequest(name="d", model="m", manifest=manifest)
    )
    return str(created.join_token)


async def _enrol(r: Running, token: str, parts: dict[str, bytes]) -> grpc.aio.AioRpcError:
    stub = r.enrolment()
    enclave = FakeEnclave(r.ca_pem, "d")
    nonce = (await stub.GetChallenge(pb.ChallengeRequest(deployment="d"))).nonce
    evidence = Evidence(platform="sev-snp", parts=parts).to_bytes()
    request = enclave.enrol_request(
        nonce, token, claims=enclave.claims(nonce, platform="sev-snp"), evidence=evidence
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Enrol(request)
    return refused.value


def _refusals(r: Running, reason: str) -> float:
    value = r.server.metrics.registry.get_sample_value(
        "custos_custodian_enrol_refusals_total", {"reason": reason}
    )
    return value or 0.0


def test_the_custodian_fetches_what_the_report_lacks_and_requires_the_crl(
    tmp_path: Path, kds: FakeKds
) -> None:
    async def scenario() -> None:
        async with running(tmp_path, amd_kds=kds.url) as r:
            token = await _lend_sev_snp(r)
            refused = await _enrol(r, token, {"report": GOSEV_REPORT.read_bytes()})
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert "/vcek/v1/Milan/crl: HTTP 404" in (refused.details() or "")
            assert _refusals(r, "collateral") == 1
            assert kds.requests == [GOSEV_VCEK_PATH, "/vcek/v1/Milan/cert_chain", "/vcek/v1/Milan/crl"]
            cache = tmp_path / "data" / "collateral" / "amd"
            assert sorted(p.name for p in cache.iterdir()) == [GOSEV_CHAIN_NAME, GOSEV_VCEK_NAME]
            assert (cache / GOSEV_VCEK_NAME).read_bytes() == GOSEV_VCEK.read_bytes()
            assert (cache / GOSEV_CHAIN_NAME).read_bytes() == GOSEV_CHAIN.read_bytes()

            # With a CRL in the evidence, the fetched VCEK and chain verify, and the CRL is checked next.
            kds.down()
            refused = await _enrol(r, token, {"report": GOSEV_REPORT.read_bytes(), "crl": b"not a CRL"})
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "AMD CRL does not parse" in (refused.details() or "")

    asyncio.run(scenario())


def test_with_kds_off_the_report_must_carry_its_certificates(tmp_path: Path, kds: FakeKds) -> None:
    async def scenario() -> None:
        async with running(tmp_path, amd_kds=None) as r:
            token = await _lend_sev_snp(r)
            refused = await _enrol(r, token, {"report": GOSEV_REPORT.read_bytes()})
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "lacks its 'vcek' part" in (refused.details() or "")
            assert kds.requests == []

    asyncio.run(scenario())


def test_custodian_serve_refuses_a_kds_url_that_is_not_http(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--data", str(tmp_path / "data"), "--amd-kds", "file:///etc/passwd"])
    assert exited.value.code == 2
    assert "--amd-kds: not an http(s) URL" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
