"""Usage receipts at the custodian: every way a receipt can be wrong is refused, recorded, and harmless."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from custodian.leases import REFUSAL_SAMPLES
from custodian.metering import ReceiptRefusedError, UsageClaim
from enclave.identity import generate_identity_key
from enclave.receipts import SignedReceipt
from tests.unit.custodian.fake_enclave import FakeEnclave
from tests.unit.custodian.harness import Custody, custody, sample

Attack = Callable[[Custody, FakeEnclave, FakeEnclave, str, str], Awaitable[object]]


async def _send(c: Custody, enclave: FakeEnclave, claim: UsageClaim) -> object:
    return await c.leases.report(await c.caller(enclave.instance_id), claim)


async def _replay(c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str) -> object:
    receipt, signed = me.receipt(lease, 6)
    await _send(c, me, UsageClaim(lease, receipt.seq, 6, False, False, signed))
    me.accepted(receipt)
    await c.report(me, lease, 7)
    # The first receipt again, now that another followed it.
    return await _send(c, me, UsageClaim(lease, receipt.seq, 6, False, False, signed))


async def _reorder(c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str) -> object:
    second, _ = me.receipt(lease, 6)
    _, third = me.receipt(lease, 7, seq=second.seq + 1, prev=second.digest())
    return await _send(c, me, UsageClaim(lease, second.seq + 1, 7, False, False, third))


async def _broken_chain(
    c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str
) -> object:
    receipt, signed = me.receipt(lease, 6, prev=os.urandom(32))
    return await _send(c, me, UsageClaim(lease, receipt.seq, 6, False, False, signed))


async def _other_key(c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str) -> object:
    receipt, signed = me.receipt(lease, 6, key=other.key)
    return await _send(c, me, UsageClaim(lease, receipt.seq, 6, False, False, signed))


async def _unknown_key(
    c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str
) -> object:
    receipt, signed = me.receipt(lease, 6, key=generate_identity_key())
    return await _send(c, me, UsageClaim(lease, receipt.seq, 6, False, False, signed))


async def _others_lease(
    c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str
) -> object:
    receipt, signed = me.receipt(other_lease, 1)
    return await _send(c, me, UsageClaim(other_lease, receipt.seq, 1, False, False, signed))


async def _as_other(c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str) -> object:
    # Another instance's genuine receipt, sent over this instance's connection.
    receipt, signed = other.receipt(other_lease, 1)
    return await _send(c, me, UsageClaim(other_lease, receipt.seq, 1, False, False, signed))


async def _forged(c: Custody, me: FakeEnclave, field: str, value: object, lease: str) -> object:
    receipt, signed = me.receipt(lease, 6, **{field: value})
    return await _send(c, me, UsageClaim(lease, receipt.seq, 6, False, False, signed))


async def _mismatch(c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str) -> object:
    receipt, signed = me.receipt(lease, 6)
    return await _send(c, me, UsageClaim(lease, receipt.seq, 9, False, False, signed))


async def _missing(c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str) -> object:
    return await _send(c, me, UsageClaim(lease, me.last_seq + 1, 6, False, False, None))


async def _not_canonical(
    c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str
) -> object:
    receipt, signed = me.receipt(lease, 6)
    body = signed.body.replace(b",", b", ")
    resigned = SignedReceipt(body, me.key.sign(body, ec.ECDSA(hashes.SHA256())))
    return await _send(c, me, UsageClaim(lease, receipt.seq, 6, False, False, resigned))


async def _flipped(c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str) -> object:
    receipt, signed = me.receipt(lease, 6)
    flipped = replace(signed, body=signed.body.replace(b'"used":6', b'"used":1'))
    return await _send(c, me, UsageClaim(lease, receipt.seq, 1, False, False, flipped))


ATTACKS: list[tuple[str, Attack, str]] = [
    ("replayed-old-receipt", _replay, "replay"),
    ("reordered", _reorder, "sequence"),
    ("broken-chain", _broken_chain, "chain"),
    ("another-instances-key", _other_key, "signature"),
    ("unknown-key", _unknown_key, "signature"),
    ("body-altered-after-signing", _flipped, "signature"),
    ("another-instances-lease", _others_lease, "binding"),
    ("another-instances-receipt", _as_other, "signature"),
    ("other-model", lambda c, me, o, lease, ol: _forged(c, me, "model_sha384", bytes(48), lease), "binding"),
    ("other-deployment", lambda c, me, o, lease, ol: _forged(c, me, "deployment", "e", lease), "binding"),
    ("report-disagrees", _mismatch, "binding"),
    ("no-receipt", _missing, "format"),
    ("not-canonical", _not_canonical, "format"),
]


@pytest.mark.parametrize(("attack", "reason"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_a_bad_receipt_is_refused_recorded_and_changes_nothing(
    tmp_path: Path, ledger_db: str | Path, attack: Attack, reason: str
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100, lease_size=20)
            mine, me = await c.enrol("d", token)
            theirs, other = await c.enrol("d", token)
            lease = (await c.leases.acquire(mine)).lease_id
            other_lease = (await c.leases.acquire(theirs)).lease_id
            await c.report(me, lease, 5)
            with pytest.raises(ReceiptRefusedError) as refused:
                await attack(c, me, other, lease, other_lease)
            assert refused.value.reason == reason
            async with c.ledger.transaction() as tx:
                [entry] = [e for e in await tx.audit_entries() if e.action == "receipt.refuse"]
                instance = await tx.instance(mine)
            assert (entry.detail["reason"], entry.detail["instance"], entry.actor) == (
                reason,
                mine,
                f"enclave:{mine}",
            )
            assert sample(c.metrics, "custos_custodian_receipt_refusals_total", reason=reason) == 1
            [usage] = await c.deployments.usage("d")
            accepted = me.last_seq
            assert instance is not None
            assert instance.last_seq == accepted
            # The chain is where it was: the enclave's next genuine receipt is taken.
            await c.report(me, lease, 8)
            [after] = await c.deployments.usage("d")
            assert after.used == usage.used + 8 - (7 if reason == "replay" else 5)

    asyncio.run(scenario())


def test_receipts_from_two_instances_chain_separately(tmp_path: Path, ledger_db: str | Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100, lease_size=20)
            first, one = await c.enrol("d", token)
            second, two = await c.enrol("d", token)
            lease_one = (await c.leases.acquire(first)).lease_id
            lease_two = (await c.leases.acquire(second)).lease_id
            for used in (1, 2, 3):
                await c.report(one, lease_one, used)
                await c.report(two, lease_two, used * 2)
            [usage] = await c.deployments.usage("d")
            assert usage.used == 9
            assert (one.last_seq, two.last_seq) == (3, 3)

    asyncio.run(scenario())


async def _huge_lease_id(
    c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str
) -> object:
    receipt, signed = me.receipt(lease, 6)
    return await _send(c, me, UsageClaim("f" * (1 << 20), receipt.seq, 6, False, False, signed))


async def _huge_signature(
    c: Custody, me: FakeEnclave, other: FakeEnclave, lease: str, other_lease: str
) -> object:
    receipt, signed = me.receipt(lease, 6)
    padded = replace(signed, signature=signed.signature + bytes(1 << 20))
    return await _send(c, me, UsageClaim(lease, receipt.seq, 6, False, False, padded))


@pytest.mark.parametrize("attack", [_huge_lease_id, _huge_signature], ids=["lease-id", "signature"])
def test_an_oversized_report_is_refused_with_a_small_audit_entry(
    tmp_path: Path, ledger_db: str | Path, attack: Attack
) -> None:
    """Issue 13 item 2: the lease id was written verbatim, up to the 1 MiB message size."""

    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100, lease_size=20)
            mine, me = await c.enrol("d", token)
            _, other = await c.enrol("d", token)
            lease = (await c.leases.acquire(mine)).lease_id
            with pytest.raises(ReceiptRefusedError) as refused:
                await attack(c, me, other, lease, "")
            assert refused.value.reason == "format"
            async with c.ledger.transaction() as tx:
                [entry] = [e for e in await tx.audit_entries() if e.action == "receipt.refuse"]
            assert len(entry.body()) < 1024
            assert "body_sha256" in entry.detail

    asyncio.run(scenario())


def test_refused_reports_are_all_counted_and_a_sample_per_instance_audited(
    tmp_path: Path, ledger_db: str | Path
) -> None:
    """Issue 13 item 2: 200 format refusals added 205 MB to the append-only log."""

    async def scenario() -> None:
        async with custody(tmp_path, database=ledger_db) as c:
            token = await c.lend("d", units=100, lease_size=20)
            mine, me = await c.enrol("d", token)
            theirs, other = await c.enrol("d", token)
            lease = (await c.leases.acquire(mine)).lease_id
            for _ in range(200):
                with pytest.raises(ReceiptRefusedError):
                    await _missing(c, me, other, lease, "")
            burst = REFUSAL_SAMPLES[0]
            assert sample(c.metrics, "custos_custodian_receipt_refusals_total", reason="format") == 200
            assert sample(c.metrics, "custos_custodian_audit_skipped_total", kind="receipt") == 200 - burst

            async def refusals() -> list[dict[str, object]]:
                async with c.ledger.transaction() as tx:
                    return [dict(e.detail) for e in await tx.audit_entries() if e.action == "receipt.refuse"]

            assert len(await refusals()) == burst
            # Another instance has its own sample; the flooding one gets one more in due time,
            # saying how many it stands for.
            other_lease = (await c.leases.acquire(theirs)).lease_id
            with pytest.raises(ReceiptRefusedError):
                await _missing(c, other, me, other_lease, "")
            assert (await refusals())[-1]["instance"] == theirs
            c.clock.advance(1 / REFUSAL_SAMPLES[1])
            with pytest.raises(ReceiptRefusedError):
                await _missing(c, me, other, lease, "")
            assert (await refusals())[-1]["left_out"] == 200 - burst

    asyncio.run(scenario())
