"""Enrolment: the checks of docs/protocol.md in order, each refusal audited and counted by reason."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from custodian._transaction import SPENT_KEPT_PAST_EXPIRY
from custodian.challenges import NONCE_SIZE
from custodian.errors import InvalidRequestError, RefusedError, SuspendedError
from enclave.errors import BindingError, EvidenceError, FormatError, ManifestError, PolicyError
from enclave.identity import generate_identity_key, public_key_der
from protos import custos_pb2 as pb
from tests.unit.custodian.fake_enclave import FakeEnclave, csr_der, sim_manifest
from tests.unit.custodian.harness import Custody, custody, sample


def test_an_attested_enclave_enrols_and_gets_a_certificate_for_its_key(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=10)
            enclave = FakeEnclave(c.tls_ca.pem, "d")
            nonce, ttl = await c.enrolment.challenge("d")
            assert (len(nonce), ttl) == (NONCE_SIZE, 60)
            request = enclave.enrol_request(nonce, token)
            enrolled = await c.enrolment.enrol(
                "d", join_token=token, evidence=request.evidence, claims=request.claims, csr=request.csr
            )
            cert = x509.load_pem_x509_certificate(enrolled.certificate_pem)
            assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == enrolled.instance_id
            assert public_key_der(cert.public_key()) == enclave.public_key  # type: ignore[arg-type]
            cert.verify_directly_issued_by(c.enclave_ca.certificate)
            assert (enrolled.offline_grace_seconds, enrolled.lease_size) == (30, 100)
            instance = await c.enrolment.authenticate(enrolled.instance_id, enclave.public_key)
            assert (instance.deployment, instance.platform) == ("d", "sim")
            with pytest.raises(RefusedError):
                await c.enrolment.authenticate(enrolled.instance_id, public_key_der(generate_identity_key()))
            with pytest.raises(RefusedError):
                await c.enrolment.authenticate("nobody", enclave.public_key)
            async with c.ledger.transaction() as tx:
                last = (await tx.audit_entries(last=1))[0]
            assert (last.action, last.detail["instance"], last.detail["simulated"]) == (
                "enrol",
                enrolled.instance_id,
                True,
            )
            assert sample(c.metrics, "custos_custodian_enrolments_total") == 1

    asyncio.run(scenario())


Build = Callable[[Custody, FakeEnclave, bytes, str], dict[str, Any]]


def _request(enclave: FakeEnclave, nonce: bytes, token: str, **changes: Any) -> dict[str, Any]:
    request = enclave.enrol_request(nonce, token, **changes)
    return {
        "join_token": request.join_token,
        "evidence": request.evidence,
        "claims": request.claims,
        "csr": request.csr,
    }


def _flip_signature(evidence: bytes) -> bytes:
    doc = json.loads(evidence)
    doc["parts"]["signature"] = doc["parts"]["body"]
    return json.dumps(doc).encode()


def _claims(enclave: FakeEnclave, nonce: bytes, token: str, **claim_changes: Any) -> dict[str, Any]:
    return _request(enclave, nonce, token, claims=enclave.claims(nonce, **claim_changes))


def _evidence_over_other_claims(enclave: FakeEnclave, nonce: bytes, token: str) -> dict[str, Any]:
    other = enclave.claims(os.urandom(32))
    evidence = enclave.attester.collect(other.report_data()).to_bytes()
    return _request(enclave, nonce, token, evidence=evidence)


REFUSALS: list[tuple[str, Build, type[Exception], str]] = [
    ("wrong-token", lambda c, e, n, t: _request(e, n, "not-the-token"), RefusedError, "token"),
    ("claims-not-json", lambda c, e, n, t: {**_request(e, n, t), "claims": b"{"}, FormatError, "format"),
    ("unknown-nonce", lambda c, e, n, t: _request(e, os.urandom(32), t), RefusedError, "nonce"),
    ("csr-garbage", lambda c, e, n, t: _request(e, n, t, csr=b"\x30\x00"), InvalidRequestError, "csr"),
    (
        "csr-bad-signature",
        lambda c, e, n, t: _request(e, n, t, csr=csr_der(e.key, signer=generate_identity_key())),
        RefusedError,
        "csr",
    ),
    (
        "csr-other-key",
        lambda c, e, n, t: _request(e, n, t, csr=csr_der(generate_identity_key())),
        RefusedError,
        "csr",
    ),
    (
        "evidence-forged",
        lambda c, e, n, t: {**_request(e, n, t), "evidence": _flip_signature(_request(e, n, t)["evidence"])},
        EvidenceError,
        "evidence",
    ),
    (
        "evidence-garbage",
        lambda c, e, n, t: {**_request(e, n, t), "evidence": b"\xff"},
        EvidenceError,
        "evidence",
    ),
    (
        "evidence-over-other-claims",
        lambda c, e, n, t: _evidence_over_other_claims(e, n, t),
        BindingError,
        "binding",
    ),
    ("claims-for-tls", lambda c, e, n, t: _claims(e, n, t, purpose="tls"), BindingError, "binding"),
    (
        "claims-other-deployment",
        lambda c, e, n, t: _claims(e, n, t, deployment="else"),
        BindingError,
        "binding",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusals_are_raised_audited_and_counted(
    tmp_path: Path, build: Build, error: type[Exception], reason: str
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d")
            enclave = FakeEnclave(c.tls_ca.pem, "d")
            nonce, _ = await c.enrolment.challenge("d")
            with pytest.raises(error):
                await c.enrolment.enrol("d", **build(c, enclave, nonce, token))
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason=reason) == 1
            async with c.ledger.transaction() as tx:
                last = (await tx.audit_entries(last=1))[0]
                assert await tx.instances() == []
            assert (last.action, last.detail["reason"]) == ("enrol.refuse", reason)
            if reason == "token":
                # A caller without the token spends nothing: the enclave's own attempt still passes.
                await c.enrolment.enrol("d", **_request(enclave, nonce, token))
            elif reason not in ("format", "nonce"):
                # Whatever failed past the token, the nonce is spent: even a correct retry is refused.
                with pytest.raises(RefusedError, match="nonce"):
                    await c.enrolment.enrol("d", **_request(enclave, nonce, token))

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"code_sha384": "ab" * 48}, "code measurement"),
    ],
    ids=["other-code"],
)
def test_evidence_that_misses_the_manifest_is_refused(
    tmp_path: Path, manifest: dict[str, Any], message: str
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            await c.upload("m", b"model")
            token = await c.deployments.create(
                "d",
                model="m",
                manifest=sim_manifest(c.tls_ca.pem, **manifest),
                offline_grace_seconds=0,
                lease_size=0,
            )
            enclave = FakeEnclave(c.tls_ca.pem, "d")
            nonce, _ = await c.enrolment.challenge("d")
            with pytest.raises(PolicyError, match=message):
                await c.enrolment.enrol("d", **_request(enclave, nonce, token))
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason="policy") == 1

    asyncio.run(scenario())


def test_a_sim_manifest_without_allow_simulation_cannot_be_lent_under(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            await c.upload("m", b"model")
            manifest = sim_manifest(c.tls_ca.pem).replace(
                "allow_simulation = true", "allow_simulation = false"
            )
            with pytest.raises(ManifestError, match="can never pass"):
                await c.deployments.create(
                    "d", model="m", manifest=manifest, offline_grace_seconds=0, lease_size=0
                )

    asyncio.run(scenario())


def test_nonces_are_single_use_expire_and_belong_to_one_deployment(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d")
            other_token = await c.lend("other")
            enclave = FakeEnclave(c.tls_ca.pem, "d")

            nonce, _ = await c.enrolment.challenge("d")
            await c.enrolment.enrol("d", **_request(enclave, nonce, token))
            with pytest.raises(RefusedError, match="already used"):
                await c.enrolment.enrol("d", **_request(FakeEnclave(c.tls_ca.pem, "d"), nonce, token))

            nonce, _ = await c.enrolment.challenge("d")
            c.clock.advance(61)
            with pytest.raises(RefusedError, match="expired"):
                await c.enrolment.enrol("d", **_request(enclave, nonce, token))

            nonce, _ = await c.enrolment.challenge("other")
            with pytest.raises(RefusedError, match="another deployment"):
                await c.enrolment.enrol("d", **_request(enclave, nonce, token))
            assert other_token != token

    asyncio.run(scenario())


def test_unknown_and_suspended_deployments_get_the_same_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            await c.lend("paused")
            await c.deployments.suspend("paused")
            answers = []
            for name in ("paused", "nope"):
                with pytest.raises(SuspendedError) as refused:
                    await c.enrolment.challenge(name)
                answers.append((type(refused.value), str(refused.value)))
            assert answers[0] == answers[1]
            enclave = FakeEnclave(c.tls_ca.pem, "nope")
            with pytest.raises(SuspendedError, match="not open for enrolment"):
                await c.enrolment.enrol("nope", **_request(enclave, os.urandom(NONCE_SIZE), "t"))

    asyncio.run(scenario())


def test_a_flood_of_challenges_blocks_no_enclave_and_stores_nothing(tmp_path: Path) -> None:
    """Issue 13 item 1: 1,024 anonymous GetChallenge calls used to fill the table for everyone."""

    async def scenario() -> None:
        async with custody(tmp_path) as c:
            await c.lend("public")
            token = await c.lend("d")
            for _ in range(2000):
                await c.enrolment.challenge("public")
            nonce, _ = await c.enrolment.challenge("d")
            enclave = FakeEnclave(c.tls_ca.pem, "d")
            await c.enrolment.enrol("d", **_request(enclave, nonce, token))
            async with c.ledger.transaction() as tx:
                # Only the nonce an enrolment spent is kept, and only until it expires.
                assert await tx.purge_spent() == 0
            # Kept past its expiry for the clock skew between replicas, then forgotten.
            c.clock.advance(c.config.nonce_ttl_seconds + 2)
            assert await c.enrolment.purge_challenges() == 0
            c.clock.advance(SPENT_KEPT_PAST_EXPIRY.total_seconds())
            assert await c.enrolment.purge_challenges() == 1

    asyncio.run(scenario())


def test_a_forged_or_altered_nonce_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d")
            nonce, _ = await c.enrolment.challenge("d")
            later = bytearray(nonce)
            later[NONCE_SIZE - 17] ^= 1  # the expiry's last byte: a nonce that lives longer
            for forged in (bytes(later), os.urandom(NONCE_SIZE), nonce[:-1]):
                with pytest.raises(RefusedError, match="nonce is unknown"):
                    await c.enrolment.enrol("d", **_request(FakeEnclave(c.tls_ca.pem, "d"), forged, token))
            await c.enrolment.enrol("d", **_request(FakeEnclave(c.tls_ca.pem, "d"), nonce, token))

    asyncio.run(scenario())


def test_enrol_request_fields_match_the_wire_contract(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            # The fake sets every field of the wire's EnrolRequest but the TPM's, as a non-TPM enclave.
            request = FakeEnclave(c.tls_ca.pem, "d").enrol_request(bytes(32), "token")
            wire = {f.name for f in pb.EnrolRequest.DESCRIPTOR.fields if not f.name.startswith("tpm_")}
            assert {f.name for f, _ in request.ListFields()} == wire

    asyncio.run(scenario())


def test_a_nonce_issued_before_a_suspension_admits_nobody_after_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d")
            nonce, _ = await c.enrolment.challenge("d")
            await c.deployments.suspend("d")
            with pytest.raises(SuspendedError, match="suspended"):
                await c.enrolment.enrol("d", **_request(FakeEnclave(c.tls_ca.pem, "d"), nonce, token))
            async with c.ledger.transaction() as tx:
                assert await tx.instances("d") == []
                [refusal] = await tx.audit_entries(last=1)
            assert (refusal.action, refusal.detail["reason"]) == ("enrol.refuse", "deployment")
            assert sample(c.metrics, "custos_custodian_enrol_refusals_total", reason="deployment") == 1

    asyncio.run(scenario())
