"""Usage receipts at the custodian: check each report's receipt against its instance's chain.

A usage report is acted on only with a receipt that (in this order) parses as
the canonical encoding, is signed by the reporting instance's enrolled key,
names this deployment, this instance, one of its leases and the deployment's
model, states prompt and completion tokens exactly when the model is a
language model (and then neither goes backwards under its lease), agrees with
the report's ``lease_id``, ``seq`` and ``used``, and is the next link of the
instance's chain (``seq`` one past the last accepted receipt, ``prev`` its
SHA-256). The one exception is the last accepted receipt sent
again unchanged: a retry, answered without effect. Anything else raises
``ReceiptRefusedError`` with the reason, which the caller writes to the audit
log (see ``custodian.leases``), as it does when the usage itself is impossible
(backwards, or past the most the lease ever allowed: reason ``usage``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from custodian.errors import RefusedError
from custodian.ledger import DeploymentRecord, InstanceRecord, LeaseRecord, ReceiptRecord, Transaction
from custodian.metrics import RECEIPT_REFUSAL_REASONS
from enclave.errors import ReceiptError
from enclave.receipts import (
    GENESIS,
    MAX_BODY_BYTES,
    Receipt,
    SignedReceipt,
    TokenCounts,
    body_digest,
    check_successor,
    verify_receipt,
)

__all__ = [
    "RECEIPT_REFUSAL_REASONS",
    "Checked",
    "ReceiptRefusedError",
    "UsageClaim",
    "check_bounds",
    "check_claim",
    "verify_claim",
]

_NO_TOKENS = TokenCounts()
# Lease ids are ``uuid4().hex`` (``custodian.leases``).
LEASE_ID = re.compile(r"[0-9a-f]{32}")
# A DER ECDSA P-256 signature is at most 72 bytes.
MAX_SIGNATURE_BYTES = 72
# What a refusal's audit entry repeats of the error's text.
MAX_DETAIL_CHARS = 256


class ReceiptRefusedError(RefusedError):
    """A usage report's receipt was refused; ``reason`` is one of ``RECEIPT_REFUSAL_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"usage receipt refused ({reason}): {message}")


@dataclass(frozen=True)
class UsageClaim:
    """One usage report: what it asks, and the receipt that must prove it."""

    lease_id: str
    seq: int
    used: int
    want_more: bool
    final: bool
    receipt: SignedReceipt | None
    # A language model's prompt and completion tokens under the lease (of ``used``); 0 and 0 otherwise.
    tokens: TokenCounts = _NO_TOKENS


@dataclass(frozen=True)
class Checked:
    lease: LeaseRecord
    # None when the report repeats the last accepted receipt (a retry): nothing to record.
    receipt: ReceiptRecord | None


def check_bounds(claim: UsageClaim) -> None:
    """Refuse (``format``) a report whose fields could not have come from an honest enclave.

    Before any other work: every field the refusal's audit entry mentions is then bounded.
    """
    if not LEASE_ID.fullmatch(claim.lease_id):
        raise ReceiptRefusedError("format", "the report's lease id is not 32 lowercase hex digits")
    if claim.receipt is not None and (
        len(claim.receipt.body) > MAX_BODY_BYTES or len(claim.receipt.signature) > MAX_SIGNATURE_BYTES
    ):
        raise ReceiptRefusedError(
            "format",
            f"the receipt is over {MAX_BODY_BYTES} bytes or its signature over {MAX_SIGNATURE_BYTES}",
        )


def verify_claim(claim: UsageClaim, public_key: bytes) -> Receipt:
    """The receipt the claim carries, parsed and its signature checked against the instance's key."""
    if claim.receipt is None:
        raise ReceiptRefusedError("format", "the usage report carries no receipt")
    try:
        return verify_receipt(claim.receipt.body, claim.receipt.signature, public_key)
    except ReceiptError as exc:
        raise ReceiptRefusedError(exc.reason, str(exc)) from None


async def check_claim(
    tx: Transaction,
    instance: InstanceRecord,
    deployment: DeploymentRecord,
    claim: UsageClaim,
    receipt: Receipt,
) -> Checked:
    """The lease the claim's ``receipt`` (from ``verify_claim``) is for, and the receipt to store.

    Raises ``ReceiptRefusedError`` when the receipt is not for this instance, its lease and its
    deployment's model, or is not the next link of the instance's chain.
    """
    assert claim.receipt is not None
    model = await tx.model_by_id(deployment.model_id)
    lease = await tx.lease(receipt.lease)
    mismatches = [
        what
        for what, ok in (
            ("deployment", receipt.deployment == deployment.name),
            ("instance", receipt.instance == instance.instance_id),
            ("lease", lease is not None and lease.instance_id == instance.instance_id),
            ("model", model is not None and receipt.model_sha384 == model.sha384),
            ("kind", model is not None and (receipt.tokens is not None) == (model.kind == "language")),
            (
                "report",
                (receipt.lease, receipt.seq, receipt.used, receipt.tokens or _NO_TOKENS)
                == (claim.lease_id, claim.seq, claim.used, claim.tokens),
            ),
        )
        if not ok
    ]
    if mismatches:
        raise ReceiptRefusedError("binding", f"receipt does not match its {', '.join(mismatches)}")
    assert lease is not None
    tokens = receipt.tokens
    if tokens is not None and (
        tokens.prompt < lease.tokens.prompt or tokens.completion < lease.tokens.completion
    ):
        raise ReceiptRefusedError(
            "usage",
            f"tokens went backwards: prompt {tokens.prompt} after {lease.tokens.prompt}, "
            f"completion {tokens.completion} after {lease.tokens.completion}",
        )
    last = await tx.receipt(instance.instance_id, instance.last_seq) if instance.last_seq else None
    if last is not None and receipt.seq == last.seq and claim.receipt.body == last.body:
        return Checked(lease, None)
    try:
        check_successor(receipt, last_seq=instance.last_seq, last_digest=last.digest if last else GENESIS)
    except ReceiptError as exc:
        raise ReceiptRefusedError(exc.reason, str(exc)) from None
    return Checked(
        lease,
        ReceiptRecord(
            instance_id=instance.instance_id,
            seq=receipt.seq,
            lease_id=receipt.lease,
            used=receipt.used,
            body=claim.receipt.body,
            signature=claim.receipt.signature,
            digest=body_digest(claim.receipt.body),  # verify_receipt checked it is canonical
            received_at=tx.now,
        ),
    )


def receipt_detail(receipt: ReceiptRecord) -> dict[str, str | int | bool]:
    """What the audit log keeps of an accepted receipt: enough to check it offline."""
    return {
        "instance": receipt.instance_id,
        "lease": receipt.lease_id,
        "seq": receipt.seq,
        "used": receipt.used,
        "body": _b64(receipt.body),
        "signature": _b64(receipt.signature),
    }


def refusal_detail(
    instance_id: str, claim: UsageClaim, error: ReceiptRefusedError
) -> dict[str, str | int | bool]:
    """What the audit log keeps of a refused report: the reason, and digests of what was sent.

    Bounded whatever the report held: the lease id only when well-formed (else its SHA-256), the
    receipt as SHA-256 digests of its body and signature, the error's text cut short.
    """
    detail: dict[str, str | int | bool] = {
        "instance": instance_id,
        "reason": error.reason,
        "detail": str(error)[:MAX_DETAIL_CHARS],
        "seq": claim.seq,
        "used": claim.used,
    }
    if LEASE_ID.fullmatch(claim.lease_id):
        detail["lease"] = claim.lease_id
    else:
        detail["lease_sha256"] = hashlib.sha256(claim.lease_id.encode()).hexdigest()
    if claim.receipt is not None:
        detail["body_sha256"] = hashlib.sha256(claim.receipt.body).hexdigest()
        detail["signature_sha256"] = hashlib.sha256(claim.receipt.signature).hexdigest()
    return detail


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
