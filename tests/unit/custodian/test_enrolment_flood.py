"""Issue 13 item 3: unauthenticated callers cannot flood the audit log, its lock, or the logs."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from custodian.challenges import NONCE_SIZE
from custodian.enrolment import ANONYMOUS_SAMPLES, SHOWN_CHARS
from custodian.errors import RefusedError, SuspendedError
from tests.unit.custodian.fake_enclave import FakeEnclave
from tests.unit.custodian.harness import Custody, custody, sample


async def _refusals(c: Custody) -> list[dict[str, object]]:
    async with c.ledger.transaction() as tx:
        entries = await tx.audit_entries()
    return [{"subject": e.subject, **e.detail} for e in entries if e.action == "enrol.refuse"]


def test_wrong_tokens_are_counted_and_only_a_sample_per_address_is_audited(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            await c.lend("d")
            request = FakeEnclave(c.tls_ca.pem, "d").enrol_request(os.urandom(NONCE_SIZE), "wrong")
            fields = {"evidence": request.evidence, "claims": request.claims, "csr": request.csr}
            for _ in range(200):
                with pytest.raises(RefusedError, match="join token"):
                    await c.enrolment.enrol("d", join_token="wrong", source="ipv4:198.51.100.7", **fields)
            burst = ANONYMOUS_SAMPLES[0]
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason="token") == 200
            assert sample(c.metrics, "custos_custodian_audit_skipped_total", kind="enrol") == 200 - burst
            audited = await _refusals(c)
            assert len(audited) == burst
            assert {a["source"] for a in audited} == {"ipv4:198.51.100.7"}
            # Another address is sampled on its own, and says nothing was left out before it.
            with pytest.raises(RefusedError):
                await c.enrolment.enrol("d", join_token="wrong", source="ipv4:192.0.2.1", **fields)
            latest = (await _refusals(c))[-1]
            assert latest["source"] == "ipv4:192.0.2.1"
            assert "left_out" not in latest
            # Once the address's rate allows another sample, it carries the count of those skipped.
            c.clock.advance(1 / ANONYMOUS_SAMPLES[1])
            with pytest.raises(RefusedError):
                await c.enrolment.enrol("d", join_token="wrong", source="ipv4:198.51.100.7", **fields)
            assert (await _refusals(c))[-1]["left_out"] == 200 - burst

    asyncio.run(scenario())


def test_unknown_credential_challenges_are_sampled_like_wrong_tokens(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            for _ in range(50):
                with pytest.raises(RefusedError, match="unknown"):
                    await c.enrolment.activate(os.urandom(16).hex(), b"", source="ipv6:[2001:db8::1]")
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason="credential") == 50
            assert len(await _refusals(c)) == ANONYMOUS_SAMPLES[0]

    asyncio.run(scenario())


def test_a_huge_deployment_name_is_echoed_nowhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = "n" * (1 << 20)

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            enclave = FakeEnclave(c.tls_ca.pem, "d")
            request = enclave.enrol_request(os.urandom(NONCE_SIZE), "t")
            with pytest.raises(SuspendedError) as refused:
                await c.enrolment.enrol(
                    name, join_token="t", evidence=request.evidence, claims=request.claims, csr=request.csr
                )
            assert len(str(refused.value)) < 200
            with pytest.raises(SuspendedError) as refused:
                await c.enrolment.challenge(name)
            assert len(str(refused.value)) < 200
            [audited] = await _refusals(c)
            assert len(str(audited["subject"])) <= SHOWN_CHARS + 3

    with caplog.at_level(logging.DEBUG):
        asyncio.run(scenario())
    ours = [r for r in caplog.records if r.name.startswith("custodian")]
    assert ours
    long = [r.getMessage()[:300] for r in ours if len(r.getMessage()) >= 1000]
    assert long == []
