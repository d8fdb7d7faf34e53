"""The overview's counts that are not the ledger's: refusals from the metrics, collateral per platform.

An in-process custodian with the web console and a clock the test sets (so that an hour passes at
once); refusals are real enrolments over gRPC with a wrong join token; collateral is what lies in
the custodian's collateral cache on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from custodian.config import Address
from custodian.web.login_socket import request_login_url
from enclave.attestation import ReferenceValues, measurement
from protos import custos_pb2 as pb
from tests.integration.custodian.harness import Running, running
from tests.unit.custodian.fake_enclave import FakeEnclave
from tests.unit.custodian.harness import Clock

pytestmark = pytest.mark.integration

_SECOND = timedelta(seconds=1)
WRONG_TOKEN = "cjt_" + "x" * 43


def _overview(opener: urllib.request.OpenerDirector, base: str) -> dict[str, Any]:
    with opener.open(f"{base}/?format=json", timeout=10) as response:
        doc: dict[str, Any] = json.loads(response.read())
    return doc


def _read(opener: urllib.request.OpenerDirector, url: str) -> str:
    with opener.open(url, timeout=10) as response:
        return str(response.read().decode())


async def _session(c: Running) -> tuple[urllib.request.OpenerDirector, str]:
    assert c.server.endpoints is not None
    socket = c.server.endpoints.admin_socket.parent / "console.sock"
    url = await asyncio.to_thread(request_login_url, socket, "tester@here")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    await asyncio.to_thread(lambda: opener.open(url, timeout=10).close())
    return opener, url.split("/login/")[0]


async def _refused_enrolments(c: Running, deployment: str, count: int) -> None:
    stub = c.enrolment()
    enclave = FakeEnclave(c.ca_pem, deployment)
    for _ in range(count):
        challenge = await stub.GetChallenge(pb.ChallengeRequest(deployment=deployment))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Enrol(enclave.enrol_request(challenge.nonce, WRONG_TOKEN))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_every_refusal_in_the_last_hour_is_counted_not_only_the_audited_sample(tmp_path: Path) -> None:
    clock = Clock(datetime.now(UTC))

    async def scenario() -> None:
        async with running(tmp_path, now=clock, console_listen=Address("127.0.0.1", 0)) as c:
            await c.lend("d")
            opener, base = await _session(c)
            await _refused_enrolments(c, "d", 8)
            doc = await asyncio.to_thread(_overview, opener, base)
            counted = doc["refusals"]
            assert counted["total"] == {"enrol": 8, "receipt": 0}
            assert counted["by_reason"]["enrol"] == {"token": 8}
            assert doc["live"]["refusals.enrol"] == "8"
            # The audit log kept a sample: a burst of 5 per address, then one each 10 s.
            (row,) = doc["deployments"]
            assert 5 <= row["refusals_last_hour"] < 8

            clock.advance(120)
            assert (await asyncio.to_thread(_overview, opener, base))["refusals"]["total"]["enrol"] == 8
            clock.advance(3600)  # the refusals are now more than an hour old
            opener, _ = await _session(c)  # the session ended after 30 minutes without a request
            later = await asyncio.to_thread(_overview, opener, base)
            assert later["refusals"]["total"] == {"enrol": 0, "receipt": 0}
            assert datetime.fromisoformat(later["refusals"]["since"]) >= clock.now - 3601 * _SECOND
            await _refused_enrolments(c, "d", 1)
            assert (await asyncio.to_thread(_overview, opener, base))["refusals"]["total"]["enrol"] == 1

    asyncio.run(scenario())


def test_collateral_freshness_is_shown_for_each_deployments_platform(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, console_listen=Address("127.0.0.1", 0)) as c:
            await c.lend("sim")
            ca_der = x509.load_pem_x509_certificate(c.ca_pem).public_bytes(serialization.Encoding.DER)
            tdx = ReferenceValues(
                platform="tdx",
                allow_simulation=False,
                custodian_ca_sha256=hashlib.sha256(ca_der).hexdigest(),
                code_sha384=measurement.code_sha384().hex(),
                registers=dict.fromkeys(("mrtd", "rtmr0", "rtmr1", "rtmr2"), "00" * 48),
            )
            await c.admin.CreateDeployment(
                pb.CreateDeploymentRequest(name="tdx", model="sim-model", manifest=tdx.to_toml())
            )
            intel = tmp_path / "data" / "collateral" / "intel"
            intel.mkdir(parents=True, exist_ok=True)
            for name, hours in (("tcb_info-00906ED50000.json", 3), ("qe_identity.json", 1)):
                (intel / name).write_text("{}")
                then = time.time() - hours * 3600
                os.utime(intel / name, (then, then))
            opener, base = await _session(c)
            rows = {d["name"]: d for d in (await asyncio.to_thread(_overview, opener, base))["deployments"]}
            assert rows["sim"]["platform"] == "sim"
            assert rows["sim"]["collateral"]["vendor"] == ""  # a sim enclave needs none
            assert rows["tdx"]["platform"] == "tdx"
            freshness = rows["tdx"]["collateral"]
            assert (freshness["vendor"], freshness["documents"]) == ("intel", 2)
            assert freshness["oldest_hours"] == pytest.approx(3.0, abs=0.1)
            assert freshness["stale"] == []
            page = await asyncio.to_thread(_read, opener, f"{base}/deployments/tdx")
            assert "intel: 2 cached, oldest 3.0 h" in page
            twin = json.loads(await asyncio.to_thread(_read, opener, f"{base}/deployments/tdx?format=json"))
            assert twin["deployment"]["collateral"] == freshness
            overview = await asyncio.to_thread(_read, opener, base + "/")
            assert "not needed" in overview
            assert "intel: 2 cached, oldest 3.0 h" in overview

    asyncio.run(scenario())
