"""Usage receipts: what an enclave instance signs for every usage report.

A receipt states, under the instance's attested identity key, how many units
it has used so far under one lease. Receipts form a hash chain per instance,
so the custodian (and anyone holding its audit export) can tell a replayed,
reordered or forged receipt from a genuine one. The encoding is fixed here and
in ``docs/protocol.md`` (Usage receipts):

- body: canonical JSON (UTF-8, keys sorted, no whitespace) of exactly
  ``type`` (``custos.usage-receipt/1``), ``deployment``, ``instance``,
  ``lease``, ``model_sha384`` (96 lowercase hex digits), ``used`` (units used
  under the lease so far), ``seq`` (1 for an instance's first receipt, then
  one more each time) and ``prev`` (64 lowercase hex digits: SHA-256 of the
  previous receipt's body, all zeros for the first);
- for a language model (a unit is a token) two more, ``prompt_tokens`` and
  ``completion_tokens``: of ``used``, which is their sum, the prompt and the
  completion tokens under the lease so far. A classifier's receipt has neither;
- signature: ECDSA P-256 with SHA-256 over the body bytes, DER-encoded.

Parsing is strict: a body that is not exactly the canonical encoding of its
own fields is refused, so one receipt has one byte representation.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclave.attestation.claims import canonical_json
from enclave.errors import ReceiptError

RECEIPT_TYPE = "custos.usage-receipt/1"
GENESIS = bytes(32)
MAX_BODY_BYTES = 2048
MAX_SIGNATURE_BYTES = 80
# Counts and sequence numbers stay inside SQLite's signed 64-bit integers.
MAX_COUNT = (1 << 63) - 1
_MAX_TEXT = 128
_FIELDS = frozenset({"type", "deployment", "instance", "lease", "model_sha384", "used", "seq", "prev"})
_TOKEN_FIELDS = _FIELDS | {"prompt_tokens", "completion_tokens"}


@dataclass(frozen=True)
class TokenCounts:
    """A language model's units: prompt and completion tokens, counted apart, both charged."""

    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.prompt + other.prompt, self.completion + other.completion)


@dataclass(frozen=True)
class Receipt:
    deployment: str
    instance: str
    lease: str
    model_sha384: bytes
    used: int
    seq: int
    prev: bytes
    # Language models only; ``tokens.total == used``.
    tokens: TokenCounts | None = None

    def body(self) -> bytes:
        fields: dict[str, str | int] = {
            "type": RECEIPT_TYPE,
            "deployment": self.deployment,
            "instance": self.instance,
            "lease": self.lease,
            "model_sha384": self.model_sha384.hex(),
            "used": self.used,
            "seq": self.seq,
            "prev": self.prev.hex(),
        }
        if self.tokens is not None:
            fields["prompt_tokens"] = self.tokens.prompt
            fields["completion_tokens"] = self.tokens.completion
        return canonical_json(fields)

    def digest(self) -> bytes:
        """SHA-256 of the body: what the next receipt's ``prev`` holds."""
        return body_digest(self.body())


def body_digest(body: bytes) -> bytes:
    """``Receipt.digest`` from the body bytes, for a body already checked to be canonical."""
    return hashlib.sha256(body).digest()


@dataclass(frozen=True)
class SignedReceipt:
    body: bytes
    signature: bytes


def sign_receipt(receipt: Receipt, key: ec.EllipticCurvePrivateKey) -> SignedReceipt:
    body = receipt.body()
    return SignedReceipt(body, key.sign(body, ec.ECDSA(hashes.SHA256())))


def parse_receipt(body: bytes) -> Receipt:
    """The receipt a body encodes; ``ReceiptError("format")`` unless it is canonical and complete."""
    if len(body) > MAX_BODY_BYTES:
        raise ReceiptError("format", f"receipt is {len(body)} bytes, over {MAX_BODY_BYTES}")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ReceiptError("format", "receipt is not JSON") from None
    if not isinstance(doc, dict) or set(doc) not in (_FIELDS, _TOKEN_FIELDS):
        raise ReceiptError("format", "receipt does not have exactly the receipt fields")
    if doc["type"] != RECEIPT_TYPE:
        raise ReceiptError("format", f"receipt type is {doc['type']!r}, expected {RECEIPT_TYPE!r}")
    receipt = Receipt(
        deployment=_text(doc, "deployment"),
        instance=_text(doc, "instance"),
        lease=_text(doc, "lease"),
        model_sha384=_hex(doc, "model_sha384", 48),
        used=_count(doc, "used"),
        seq=_count(doc, "seq"),
        prev=_hex(doc, "prev", 32),
        tokens=(
            TokenCounts(_count(doc, "prompt_tokens"), _count(doc, "completion_tokens"))
            if "prompt_tokens" in doc
            else None
        ),
    )
    if receipt.tokens is not None and receipt.tokens.total != receipt.used:
        raise ReceiptError("format", "receipt's prompt and completion tokens do not add up to its units used")
    if receipt.seq < 1:
        raise ReceiptError("format", "receipt sequence numbers start at 1")
    if receipt.body() != body:
        raise ReceiptError("format", "receipt is not in canonical form")
    return receipt


def verify_receipt(body: bytes, signature: bytes, public_key_der: bytes) -> Receipt:
    """Parse the body and check its signature against the instance's key (SubjectPublicKeyInfo, DER)."""
    receipt = parse_receipt(body)
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise ReceiptError("signature", "receipt signature is too long")
    key = _instance_key(public_key_der)
    try:
        key.verify(signature, body, _ECDSA_SHA256)
    except InvalidSignature:
        raise ReceiptError("signature", "receipt signature does not verify with the instance's key") from None
    return receipt


# Every report of an instance is checked against the same key: parse each key once.
@functools.lru_cache(maxsize=4096)
def _instance_key(public_key_der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(public_key_der)
    except ValueError:
        raise ReceiptError("signature", "the instance key does not parse") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ReceiptError("signature", "the instance key is not a P-256 key")
    return key


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def check_successor(receipt: Receipt, *, last_seq: int, last_digest: bytes) -> None:
    """Raise unless ``receipt`` follows ``last_seq`` (0: none), whose body hashes to ``last_digest``."""
    if receipt.seq <= last_seq:
        raise ReceiptError(
            "replay", f"receipt sequence {receipt.seq} was already used (last accepted: {last_seq})"
        )
    if receipt.seq != last_seq + 1:
        raise ReceiptError(
            "sequence", f"receipt sequence {receipt.seq} skips ahead (expected {last_seq + 1})"
        )
    if receipt.prev != last_digest:
        raise ReceiptError("chain", f"receipt {receipt.seq} does not link to the previous receipt")


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc[name]
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT:
        raise ReceiptError("format", f"receipt field {name} must be a string of 1 to {_MAX_TEXT} characters")
    return value


def _hex(doc: dict[str, Any], name: str, size: int) -> bytes:
    value = doc[name]
    if not isinstance(value, str) or len(value) != 2 * size or value != value.lower():
        raise ReceiptError("format", f"receipt field {name} must be {2 * size} lowercase hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ReceiptError("format", f"receipt field {name} is not hex") from None


def _count(doc: dict[str, Any], name: str) -> int:
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ReceiptError("format", f"receipt field {name} must be a whole number below 2**63")
    return value
