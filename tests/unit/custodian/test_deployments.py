"""Deployments: creation and its checks, tokens, grant and revoke, the kill switch, listings."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from custodian.authority import CertificateAuthority
from custodian.errors import ConflictError, CustodianError, InvalidRequestError, NotFoundError, RefusedError
from enclave.attestation import ReferenceValues
from enclave.errors import ManifestError
from tests.unit.custodian.fake_enclave import sim_manifest
from tests.unit.custodian.harness import Clock, Custody, custody, sample


def _foreign_ca_manifest(c: Custody, tmp_path: Path) -> str:
    other = CertificateAuthority.load_or_create(tmp_path, "foreign", "Someone else", now=Clock().now)
    return sim_manifest(other.pem)


def _unverifiable_manifest(c: Custody, tmp_path: Path) -> str:
    return sim_manifest(c.tls_ca.pem).replace('platform = "sim"', 'platform = "no-such-platform"')


CREATE_REFUSALS: list[tuple[str, dict[str, Any], type[Exception]]] = [
    ("bad-name", {"name": "no spaces"}, InvalidRequestError),
    ("unknown-model", {"model": "missing"}, NotFoundError),
    ("manifest-not-toml", {"manifest": lambda c, p: "not = [toml"}, ManifestError),
    ("manifest-empty", {"manifest": lambda c, p: ""}, ManifestError),
    ("manifest-other-custodian", {"manifest": _foreign_ca_manifest}, InvalidRequestError),
    ("manifest-unverifiable-platform", {"manifest": _unverifiable_manifest}, ManifestError),
    ("grace-too-short", {"offline_grace_seconds": 1}, InvalidRequestError),
    ("lease-too-large", {"lease_size": 10**8}, InvalidRequestError),
    ("name-taken", {"name": "taken"}, ConflictError),
]


@pytest.mark.parametrize(
    ("changes", "error"), [r[1:] for r in CREATE_REFUSALS], ids=[r[0] for r in CREATE_REFUSALS]
)
def test_create_refuses(
    tmp_path: Path, ledger_db: str | Path, changes: dict[str, Any], error: type[Exception]
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            await c.upload("m", b"model")
            await c.lend("taken")
            args: dict[str, Any] = {
                "name": "d",
                "model": "m",
                "manifest": sim_manifest(c.tls_ca.pem),
                "offline_grace_seconds": 0,
                "lease_size": 0,
                **changes,
            }
            if callable(args["manifest"]):
                args["manifest"] = args["manifest"](c, tmp_path)
            with pytest.raises(error):
                await c.deployments.create(args.pop("name"), **args)
            assert [u.name for u in await c.deployments.usage()] == ["taken"]

    asyncio.run(scenario())


def test_the_approved_manifest_allows_the_deployments_model(tmp_path: Path, ledger_db: str | Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            model = await c.upload("m", b"model bytes")
            await c.deployments.create(
                "d", model="m", manifest=sim_manifest(c.tls_ca.pem), offline_grace_seconds=0, lease_size=0
            )
            approved = ReferenceValues.from_toml(await c.deployments.manifest("d"))
            assert approved.allowed_model_sha384 == (model.sha384.hex(),)
            assert approved.custodian_ca_sha256 == c.tls_ca.sha256
            [usage] = await c.deployments.usage("d")
            assert (usage.model, usage.offline_grace_seconds, usage.lease_size) == ("m", 30, 100)

    asyncio.run(scenario())


def test_a_rotated_token_replaces_the_old_one(tmp_path: Path, ledger_db: str | Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            old = await c.lend("d")
            new = await c.deployments.rotate_token("d")
            assert new != old
            with pytest.raises(RefusedError, match="join token"):
                await c.enrol("d", old)
            await c.enrol("d", new)

    asyncio.run(scenario())


def test_grant_adds_and_revoke_takes_the_balance_then_leases_and_wakes_watchers(
    tmp_path: Path, ledger_db: str | Path
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100, lease_size=60)
            await c.lend("other")
            instance, enclave = await c.enrol("d", token)
            lease = await c.leases.acquire(instance)
            await c.report(enclave, lease.lease_id, 15)
            usage, added = await c.deployments.grant("d", 20)
            assert (added, usage.balance, usage.granted_total) == (20, 60, 120)
            with c.bus.subscribe(instance, "d") as mine, c.bus.subscribe("x", "other") as theirs:
                usage, taken = await c.deployments.revoke("d", units=70, everything=False)
                assert (taken, usage.balance, usage.leased) == (70, 0, 35)
                assert await mine.wait(0)
                assert not await theirs.wait(0)
            view = await c.leases.touch(instance)
            assert view.limit == 50
            usage, taken = await c.deployments.revoke("d", units=0, everything=True)
            assert (taken, usage.leased, usage.used) == (35, 0, 15)
            usage, taken = await c.deployments.revoke("d", units=5, everything=False)
            assert taken == 0
            assert sample(c.metrics, "custos_custodian_units_revoked_total") == 105
            assert sample(c.metrics, "custos_custodian_units_granted_total") == 120

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.deployments.revoke("d", units=0, everything=False), InvalidRequestError),
        (lambda c: c.deployments.revoke("d", units=5, everything=True), InvalidRequestError),
        (lambda c: c.deployments.grant("d", 0), InvalidRequestError),
        (lambda c: c.deployments.grant("nope", 5), NotFoundError),
        (lambda c: c.deployments.suspend("nope"), NotFoundError),
        (lambda c: c.deployments.usage("nope"), NotFoundError),
        (lambda c: c.roster.enclaves("nope"), NotFoundError),
        (lambda c: c.deployments.manifest("nope"), NotFoundError),
        (lambda c: c.deployments.rotate_token("nope"), NotFoundError),
    ],
    ids=["revoke-neither", "revoke-both", "grant-zero", "grant-unknown", "suspend-unknown", "usage-unknown",
         "enclaves-unknown", "manifest-unknown", "rotate-unknown"],
)  # fmt: skip
def test_admin_misuse(tmp_path: Path, ledger_db: str | Path, call: Any, error: type[CustodianError]) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            await c.lend("d", units=10)
            with pytest.raises(error):
                await call(c)

    asyncio.run(scenario())


def test_suspend_stops_the_model_push_at_once_and_resume_restores_it(
    tmp_path: Path, ledger_db: str | Path
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=10)
            instance_id, enclave = await c.enrol("d", token)
            instance = await c.enrolment.authenticate(instance_id, enclave.public_key)
            with c.bus.subscribe(instance_id, "d") as watcher:
                usage = await c.deployments.suspend("d")
                assert usage.suspended
                assert await watcher.wait(0)
                with pytest.raises(RefusedError, match="suspended"):
                    await c.deployments.release_model(instance)
                assert not (await c.deployments.resume("d")).suspended
                assert await watcher.wait(0)
            model = await c.deployments.release_model(instance)
            assert model.name == "d-model"

    asyncio.run(scenario())


def test_enclaves_listing_shows_leases_and_open_streams(tmp_path: Path, ledger_db: str | Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=10)
            await c.lend("e")
            first, enclave = await c.enrol("d", token)
            second, _ = await c.enrol("d", token)
            lease = await c.leases.acquire(first)
            await c.report(enclave, lease.lease_id, 3)
            with c.bus.subscribe(second, "d"):
                listed = {e.instance_id: e for e in await c.roster.enclaves("d")}
            assert set(listed) == {first, second}
            one, two = listed[first], listed[second]
            assert (one.lease_limit, one.lease_state, one.connected, one.state) == (
                10,
                "active",
                False,
                "offline",
            )
            assert one.offline_since == one.last_seen
            assert (one.last_receipt_seq, one.last_receipt_used, one.last_receipt_at) == (1, 3, c.clock.now)
            assert (two.lease_id, two.connected, two.state, two.offline_since) == (
                "",
                True,
                "connected",
                None,
            )
            assert one.key_sha256 == hashlib.sha256(enclave.public_key).hexdigest()
            assert await c.roster.enclaves("e") == []
            assert len(await c.roster.enclaves()) == 2
            await c.report(enclave, lease.lease_id, 4, final=True)
            [one] = [e for e in await c.roster.enclaves("d") if e.instance_id == first]
            assert (one.state, one.lease_state, one.lease_used) == ("stopped", "closed", 4)
            # An active lease is shown before any closed one, and of the closed ones the newest.
            again = await c.leases.acquire(first)
            [one] = [e for e in await c.roster.enclaves("d") if e.instance_id == first]
            assert (one.lease_id, one.lease_state) == (again.lease_id, "active")
            await c.report(enclave, again.lease_id, 1, final=True)
            [one] = [e for e in await c.roster.enclaves("d") if e.instance_id == first]
            assert (one.lease_id, one.lease_state, one.lease_used) == (again.lease_id, "closed", 1)
            [usage] = await c.deployments.usage("d")
            # Both enrolled, neither holds a lease now (one stopped, one never took one): none is live.
            assert usage.instances == 0

    asyncio.run(scenario())


def test_usage_adds_up_and_counts_only_live_instances(tmp_path: Path, ledger_db: str | Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=1000, lease_size=100)
            stopping, stopping_enclave = await c.enrol("d", token)
            vanishing, _ = await c.enrol("d", token)
            live, live_enclave = await c.enrol("d", token)
            stopped = await c.leases.acquire(stopping)
            await c.report(stopping_enclave, stopped.lease_id, 30, final=True)
            await c.leases.acquire(vanishing)
            c.clock.advance(40)  # past the 30 s grace: the vanished instance's lease expires
            assert await c.leases.expire_due() == 1
            serving = await c.leases.acquire(live)
            await c.report(live_enclave, serving.lease_id, 20)
            await c.deployments.revoke("d", units=50, everything=False, origin="test")
            [usage] = await c.deployments.usage("d")
            assert (usage.revoked, usage.used, usage.unreported, usage.instances) == (50, 50, 100, 1)
            assert usage.granted_total + usage.overdrawn == (
                usage.balance + usage.leased + usage.used + usage.unreported + usage.revoked
            )

    asyncio.run(scenario())
