"""A language model's deployment: a unit is a token; prompt and completion counted apart, both charged."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from custodian.metering import ReceiptRefusedError, UsageClaim
from enclave.receipts import TokenCounts
from tests.unit.custodian.harness import Custody, custody


def as_language_model(tmp_path: Path, model: str) -> None:
    """What `custodian model add FILE.gguf` records (the model half of issue 14): kind 'language'."""
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        db.execute("UPDATE models SET kind = 'language' WHERE name = ?", (model,))


async def lend_language_model(c: Custody, tmp_path: Path, tokens: int) -> str:
    token = await c.lend("llm", units=0, lease_size=500)
    as_language_model(tmp_path, "llm-model")
    await c.deployments.grant("llm", tokens)
    return token


def test_usage_shows_prompt_and_completion_tokens_and_charges_both(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await lend_language_model(c, tmp_path, 1000)
            instance, enclave = await c.enrol("llm", token)
            lease = (await c.leases.acquire(instance)).lease_id
            await c.report(enclave, lease, 30, tokens=TokenCounts(prompt=20, completion=10))
            await c.report(enclave, lease, 75, tokens=TokenCounts(prompt=40, completion=35), final=True)
            [usage] = await c.deployments.usage("llm")
            assert (usage.unit, usage.prompt_tokens, usage.completion_tokens) == ("token", 40, 35)
            assert usage.used == 75
            assert usage.balance == 1000 - 75

            # A classifier's deployment is untouched: a call is one unit, no token counts.
            classifier_token = await c.lend("d", units=10, lease_size=5)
            mine, me = await c.enrol("d", classifier_token)
            await c.report(me, (await c.leases.acquire(mine)).lease_id, 2)
            [classifier] = await c.deployments.usage("d")
            assert (classifier.unit, classifier.used, classifier.prompt_tokens) == ("inference", 2, 0)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("kind", "tokens", "reason"),
    [
        pytest.param("language", None, "binding", id="language-without-tokens"),
        pytest.param("classifier", TokenCounts(4, 2), "binding", id="classifier-with-tokens"),
    ],
)
def test_a_receipt_must_count_tokens_exactly_when_the_model_is_a_language_model(
    tmp_path: Path, kind: str, tokens: TokenCounts | None, reason: str
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await c.lend("d", units=100, lease_size=20)
            if kind == "language":
                as_language_model(tmp_path, "d-model")
            instance, enclave = await c.enrol("d", token)
            lease = (await c.leases.acquire(instance)).lease_id
            with pytest.raises(ReceiptRefusedError) as refused:
                await c.report(enclave, lease, 6, tokens=tokens)
            assert refused.value.reason == reason
            assert "kind" in str(refused.value)

    asyncio.run(scenario())


def test_token_counts_that_go_backwards_are_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await lend_language_model(c, tmp_path, 1000)
            instance, enclave = await c.enrol("llm", token)
            lease = (await c.leases.acquire(instance)).lease_id
            await c.report(enclave, lease, 30, tokens=TokenCounts(prompt=20, completion=10))
            with pytest.raises(ReceiptRefusedError) as refused:
                await c.report(enclave, lease, 31, tokens=TokenCounts(prompt=10, completion=21))
            assert refused.value.reason == "usage"
            [usage] = await c.deployments.usage("llm")
            assert (usage.used, usage.prompt_tokens, usage.completion_tokens) == (30, 20, 10)

    asyncio.run(scenario())


def test_a_report_whose_token_counts_disagree_with_its_receipt_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            token = await lend_language_model(c, tmp_path, 1000)
            instance, enclave = await c.enrol("llm", token)
            lease = (await c.leases.acquire(instance)).lease_id
            receipt, signed = enclave.receipt(lease, 30, tokens=TokenCounts(prompt=20, completion=10))
            claim = UsageClaim(lease, receipt.seq, 30, False, False, signed, TokenCounts(25, 5))
            with pytest.raises(ReceiptRefusedError) as refused:
                await c.leases.report(await c.caller(instance), claim)
            assert refused.value.reason == "binding"
            assert "report" in str(refused.value)

    asyncio.run(scenario())
