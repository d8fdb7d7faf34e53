"""The audit log as a file: export it as JSON Lines, and check such a file offline.

``custodian audit export`` writes, one JSON object per line:

1. a header: ``{"type": "custos.audit-export/1", "exported_at", "first_seq",
   "last_seq", "previous_hash", "last_hash"}`` — ``previous_hash`` is the hash
   of the entry before ``first_seq`` (all zeros for a full export), the anchor
   a partial export (``--since``) is checked from;
2. one ``{"type": "instance", "instance", "deployment", "platform",
   "public_key", "key_sha256", "enrolled_at"}`` per enrolled instance, the
   public key as base64 DER (SubjectPublicKeyInfo), so receipts can be checked;
3. one ``{"type": "entry", "seq", "at", "actor", "action", "subject",
   "detail", "hash"}`` per audit entry, in order.

``verify`` needs nothing but the file: it recomputes the hash chain
(``custodian.audit``) and checks every receipt entry (signature with its
instance's key, the key against the SHA-256 its enrolment recorded, the
receipt chain per instance, and that the receipt's lease was opened for that
instance). It sums what the receipts prove per deployment and what expired
leases were charged beyond them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from custodian.audit import GENESIS, AuditEntry, verify_chain
from custodian.errors import LedgerError
from custodian.ledger import InstanceRecord
from enclave.errors import ReceiptError
from enclave.receipts import GENESIS as RECEIPT_GENESIS
from enclave.receipts import Receipt, check_successor, verify_receipt

EXPORT_FORMAT = "custos.audit-export/1"
# Bounds on what verify reads: a line and the whole file.
MAX_LINE_BYTES = 1 << 20
MAX_FILE_BYTES = 4 << 30


@dataclass
class DeploymentTotals:
    # Units the receipts prove (per lease, the highest count signed).
    proven: int = 0
    # Units charged for expired leases beyond their receipts, not settled by a later receipt.
    unreported: int = 0


@dataclass
class Verified:
    entries: int
    first_seq: int
    last_hash: bytes
    receipts: int
    # Instances whose first receipt in the file is not their first ever (a partial export).
    anchored_instances: int
    deployments: dict[str, DeploymentTotals] = field(default_factory=dict)


# ------------------------------------------------------------------ export


def header_line(
    *, first_seq: int, last_seq: int, previous_hash: bytes, last_hash: bytes, now: datetime
) -> str:
    """The export's first line (``first_seq`` and ``last_seq`` are 0 when it holds no entry)."""
    return _line(
        {
            "type": EXPORT_FORMAT,
            "exported_at": now.isoformat(),
            "first_seq": first_seq,
            "last_seq": last_seq,
            "previous_hash": previous_hash.hex(),
            "last_hash": last_hash.hex(),
        }
    )


def instance_line(i: InstanceRecord) -> str:
    return _line(
        {
            "type": "instance",
            "instance": i.instance_id,
            "deployment": i.deployment,
            "platform": i.platform,
            "public_key": base64.b64encode(i.public_key).decode(),
            "key_sha256": i.key_sha256,
            "enrolled_at": i.enrolled_at.isoformat(),
        }
    )


def entry_line(e: AuditEntry) -> str:
    return _line(
        {
            "type": "entry",
            "seq": e.seq,
            "at": e.at,
            "actor": e.actor,
            "action": e.action,
            "subject": e.subject,
            "detail": dict(e.detail),
            "hash": e.hash.hex(),
        }
    )


def parse_since(since: str) -> int | datetime:
    """``--since``: an entry number, or an ISO 8601 time (UTC if it names no zone)."""
    if since.isdigit():
        return max(1, int(since))
    try:
        when = datetime.fromisoformat(since)
    except ValueError:
        raise LedgerError(f"--since {since!r} is neither an entry number nor an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def written_at_or_after(entry: AuditEntry, when: datetime) -> bool:
    return datetime.fromisoformat(entry.at) >= when


def _line(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------ verify


def verify_file(path: Path) -> Verified:
    """Check an export offline; raise ``LedgerError`` naming the first thing that does not hold."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise LedgerError(f"{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")
    with path.open("rb") as handle:
        return verify_lines(handle)


def verify_lines(lines: Iterable[bytes]) -> Verified:
    """Check an export line by line: memory grows with its instances, not with its entries."""
    docs = _parse(lines)
    header = next(docs, None)
    if header is None or header.get("type") != EXPORT_FORMAT:
        raise LedgerError(f"not a {EXPORT_FORMAT} file: the first line is not its header")
    first_seq = _int(header, "first_seq", 1)
    chain = ChainCheck(previous=_hex(header, "previous_hash", 1), first_seq=first_seq or 1)
    keys: dict[str, bytes] = {}
    receipts = _Receipts(keys)
    for number, doc in enumerate(docs, start=2):
        kind = doc.get("type")
        if kind == "instance" and not chain.length:
            instance, key = _instance(doc, number)
            keys[instance] = key
        elif kind == "entry":
            entry = _entry(doc, number)
            chain.add(entry)
            receipts.add(entry)
        else:
            raise LedgerError(f"line {number}: unexpected {kind!r} record")
    if chain.length and (
        chain.next_seq - 1 != _int(header, "last_seq", 1) or chain.last_hash.hex() != header["last_hash"]
    ):
        raise LedgerError("the export ends before the entry its header names: it was truncated")
    return receipts.result(entries=chain.length, first_seq=first_seq, last_hash=chain.last_hash)


class ChainCheck:
    """The hash chain checked one entry at a time (``custodian.audit.verify_chain``, streamed)."""

    def __init__(self, *, previous: bytes = GENESIS, first_seq: int = 1) -> None:
        self.last_hash = previous
        self.next_seq = first_seq
        self.length = 0

    def add(self, entry: AuditEntry) -> None:
        self.last_hash = verify_chain([entry], previous=self.last_hash, first_seq=self.next_seq)
        self.next_seq += 1
        self.length += 1


class _Receipts:
    """Every receipt entry against its instance's key and chain; usage totals per deployment."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self._keys = keys
        self._heads: dict[str, Receipt] = {}
        self._lease_owner: dict[str, str] = {}
        self._proven: dict[str, tuple[str, int]] = {}  # lease -> (deployment, highest used)
        self._unreported: dict[str, tuple[str, int]] = {}  # lease -> (deployment, charged at expiry)
        self._anchored = 0
        self._count = 0

    def add(self, entry: AuditEntry) -> None:
        try:
            self._entry(entry)
        except (ReceiptError, LedgerError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise LedgerError(f"audit entry {entry.seq} ({entry.action}): {exc}") from None

    def result(self, *, entries: int, first_seq: int, last_hash: bytes) -> Verified:
        totals: dict[str, DeploymentTotals] = {}
        for deployment, used in self._proven.values():
            totals.setdefault(deployment, DeploymentTotals()).proven += used
        for deployment, unreported in self._unreported.values():
            totals.setdefault(deployment, DeploymentTotals()).unreported += unreported
        return Verified(
            entries=entries,
            first_seq=first_seq,
            last_hash=last_hash,
            receipts=self._count,
            anchored_instances=self._anchored,
            deployments=totals,
        )

    def _entry(self, entry: AuditEntry) -> None:
        detail = entry.detail
        if entry.action == "enrol":
            instance = str(detail["instance"])
            key = self._keys.get(instance)
            if key is None or hashlib.sha256(key).hexdigest() != detail["key_sha256"]:
                raise LedgerError(f"the export's key for instance {instance} is not the one enrolled")
            if "public_key" in detail and base64.b64decode(str(detail["public_key"])) != key:
                raise LedgerError(f"the enrolment of instance {instance} recorded another key")
        elif entry.action == "lease.open":
            self._lease_owner[str(detail["lease"])] = entry.actor.removeprefix("enclave:")
        elif entry.action == "lease.expire" and int(detail.get("unreported", 0)):
            self._unreported[str(detail["lease"])] = (entry.subject, int(detail["unreported"]))
        elif entry.action == "receipt":
            self._receipt(entry)

    def _receipt(self, entry: AuditEntry) -> None:
        detail = entry.detail
        instance = str(detail["instance"])
        key = self._keys.get(instance)
        if key is None:
            raise LedgerError(f"the export carries no key for instance {instance}")
        receipt = verify_receipt(
            base64.b64decode(str(detail["body"]), validate=True),
            base64.b64decode(str(detail["signature"]), validate=True),
            key,
        )
        stated = (receipt.instance, receipt.lease, receipt.seq, receipt.used, receipt.deployment)
        if stated != (instance, detail["lease"], detail["seq"], detail["used"], entry.subject):
            raise LedgerError("the entry does not state what its signed receipt says")
        owner = self._lease_owner.get(receipt.lease)
        if owner is not None and owner != instance:
            raise LedgerError(f"lease {receipt.lease} was opened for instance {owner}, not {instance}")
        head = self._heads.get(instance)
        if head is not None:
            check_successor(receipt, last_seq=head.seq, last_digest=head.digest())
        elif receipt.seq == 1 and receipt.prev != RECEIPT_GENESIS:
            raise ReceiptError("chain", "an instance's first receipt must start the chain")
        elif receipt.seq != 1:
            self._anchored += 1
        self._heads[instance] = receipt
        self._count += 1
        _, proven = self._proven.get(receipt.lease, (receipt.deployment, 0))
        self._proven[receipt.lease] = (receipt.deployment, max(proven, receipt.used))
        self._unreported.pop(receipt.lease, None)


def _parse(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    for number, raw in enumerate(lines, start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise LedgerError(f"line {number} is over {MAX_LINE_BYTES} bytes")
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise LedgerError(f"line {number} is not JSON") from None
        if not isinstance(doc, dict):
            raise LedgerError(f"line {number} is not a JSON object")
        yield doc


def _instance(doc: dict[str, Any], number: int) -> tuple[str, bytes]:
    try:
        key = base64.b64decode(str(doc["public_key"]), validate=True)
        instance = str(doc["instance"])
    except (KeyError, binascii.Error):
        raise LedgerError(f"line {number}: malformed instance record") from None
    if hashlib.sha256(key).hexdigest() != doc.get("key_sha256"):
        raise LedgerError(f"line {number}: instance {instance}'s key does not match its SHA-256")
    return instance, key


def _entry(doc: dict[str, Any], number: int) -> AuditEntry:
    detail = doc.get("detail")
    if not isinstance(detail, dict) or not all(isinstance(v, str | int | bool) for v in detail.values()):
        raise LedgerError(f"line {number}: malformed audit entry detail")
    try:
        return AuditEntry(
            seq=_int(doc, "seq", number),
            at=str(doc["at"]),
            actor=str(doc["actor"]),
            action=str(doc["action"]),
            subject=str(doc["subject"]),
            detail=detail,
            hash=_hex(doc, "hash", number),
        )
    except KeyError as exc:
        raise LedgerError(f"line {number}: audit entry without {exc}") from None


def _int(doc: Mapping[str, Any], name: str, number: int) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"line {number}: {name} is not a whole number")
    return value


def _hex(doc: Mapping[str, Any], name: str, number: int) -> bytes:
    value = doc.get(name)
    try:
        digest = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise LedgerError(f"line {number}: {name} is not a SHA-256 in hex")
    return digest
