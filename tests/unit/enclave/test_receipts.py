"""Usage receipts: the canonical encoding (known answer), signing, and strict parsing."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave.errors import ReceiptError
from enclave.identity import generate_identity_key, public_key_der
from enclave.receipts import (
    GENESIS,
    Receipt,
    TokenCounts,
    check_successor,
    parse_receipt,
    sign_receipt,
    verify_receipt,
)

RECEIPT = Receipt(
    deployment="acme",
    instance="0123456789abcdef0123456789abcdef",
    lease="fedcba9876543210fedcba9876543210",
    model_sha384=bytes(range(48)),
    used=42,
    seq=7,
    prev=bytes(32),
)
# The encoding docs/protocol.md specifies, byte for byte.
BODY = (
    b'{"deployment":"acme","instance":"0123456789abcdef0123456789abcdef",'
    b'"lease":"fedcba9876543210fedcba9876543210",'
    b'"model_sha384":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'
    b'202122232425262728292a2b2c2d2e2f",'
    b'"prev":"0000000000000000000000000000000000000000000000000000000000000000",'
    b'"seq":7,"type":"custos.usage-receipt/1","used":42}'
)
KEY = generate_identity_key()
SIGNED = sign_receipt(RECEIPT, KEY)


def test_the_body_is_the_documented_canonical_json() -> None:
    assert RECEIPT.body() == BODY
    assert RECEIPT.digest() == hashlib.sha256(BODY).digest()
    assert parse_receipt(BODY) == RECEIPT


def test_a_signed_receipt_verifies_with_its_key_only() -> None:
    assert verify_receipt(SIGNED.body, SIGNED.signature, public_key_der(KEY)) == RECEIPT
    with pytest.raises(ReceiptError, match="signature") as refused:
        verify_receipt(SIGNED.body, SIGNED.signature, public_key_der(generate_identity_key()))
    assert refused.value.reason == "signature"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=len(BODY) - 1), st.integers(min_value=1, max_value=255))
def test_any_changed_byte_of_the_body_is_refused(index: int, delta: int) -> None:
    body = bytearray(SIGNED.body)
    body[index] = (body[index] + delta) % 256
    with pytest.raises(ReceiptError):
        verify_receipt(bytes(body), SIGNED.signature, public_key_der(KEY))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        BODY.replace(b'"seq":7,', b""),
        BODY.replace(b'"used":42', b'"used":42,"extra":1'),
        BODY.replace(b'"used":42', b'"used":-1'),
        BODY.replace(b'"used":42', b'"used":true'),
        BODY.replace(b'"seq":7', b'"seq":0'),
        BODY.replace(b'"seq":7', b'"seq":9223372036854775808'),
        BODY.replace(b"custos.usage-receipt/1", b"custos.usage-receipt/2"),
        BODY.replace(b'"prev":"00', b'"prev":"'),
        BODY.replace(b"0a0b0c", b"0A0B0C"),
        BODY.replace(b'"deployment":"acme"', b'"deployment":""'),
        BODY.replace(b",", b", "),
        BODY + b" " * 3000,
    ],
    ids=["not-json", "not-object", "missing-field", "extra-field", "negative", "boolean", "seq-zero",
         "seq-too-large", "other-type", "short-hash", "uppercase-hex", "empty-name", "not-canonical",
         "too-large"],
)  # fmt: skip
def test_malformed_bodies_are_refused_as_format(body: bytes) -> None:
    with pytest.raises(ReceiptError) as refused:
        parse_receipt(body)
    assert refused.value.reason == "format"


def test_the_chain_names_replays_gaps_and_broken_links() -> None:
    first = Receipt("d", "i", "l", bytes(48), 1, 1, GENESIS)
    second = Receipt("d", "i", "l", bytes(48), 2, 2, first.digest())
    check_successor(first, last_seq=0, last_digest=GENESIS)
    check_successor(second, last_seq=1, last_digest=first.digest())
    for receipt, last_seq, last_digest, reason in [
        (first, 1, first.digest(), "replay"),
        (second, 0, GENESIS, "sequence"),
        (second, 1, GENESIS, "chain"),
    ]:
        with pytest.raises(ReceiptError) as refused:
            check_successor(receipt, last_seq=last_seq, last_digest=last_digest)
        assert refused.value.reason == reason


TOKEN_RECEIPT = replace(RECEIPT, tokens=TokenCounts(prompt=30, completion=12))
# A language model's receipt: the same fields, plus its tokens (docs/protocol.md, Usage receipts).
TOKEN_BODY = BODY.replace(b'"deployment":', b'"completion_tokens":12,"deployment":').replace(
    b'"seq":7,', b'"prompt_tokens":30,"seq":7,'
)


def test_a_language_models_receipt_carries_its_prompt_and_completion_tokens() -> None:
    assert TOKEN_RECEIPT.body() == TOKEN_BODY
    assert parse_receipt(TOKEN_BODY) == TOKEN_RECEIPT
    signed = sign_receipt(TOKEN_RECEIPT, KEY)
    assert verify_receipt(signed.body, signed.signature, public_key_der(KEY)).tokens == TokenCounts(30, 12)


@pytest.mark.parametrize(
    "body",
    [
        TOKEN_BODY.replace(b'"prompt_tokens":30,', b""),
        TOKEN_BODY.replace(b'"prompt_tokens":30', b'"prompt_tokens":31'),
        TOKEN_BODY.replace(b'"completion_tokens":12', b'"completion_tokens":-12'),
    ],
    ids=["only-one-count", "counts-do-not-add-up", "negative"],
)
def test_token_counts_that_do_not_add_up_are_refused(body: bytes) -> None:
    with pytest.raises(ReceiptError) as refused:
        parse_receipt(body)
    assert refused.value.reason == "format"
