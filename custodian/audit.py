"""The audit log's hash chain: entries, their canonical bodies, and checking the links.

Entry ``n`` stores ``hash(n) = SHA-256(hash(n-1) || body(n))`` where
``body(n)`` is the canonical JSON (``enclave.attestation.claims.canonical_json``)
of ``{seq, at, actor, action, subject, detail}`` and ``hash(0)`` is 32 zero
bytes. Pure: the ledger stores entries, ``custodian.audit_file`` exports and
checks them offline, both through ``verify_chain``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from custodian.errors import LedgerError
from enclave.attestation.claims import canonical_json

AuditValue = str | int | bool
GENESIS = bytes(32)


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: str
    actor: str
    action: str
    subject: str
    detail: Mapping[str, AuditValue]
    hash: bytes

    def body(self) -> bytes:
        return canonical_json(
            {
                "seq": self.seq,
                "at": self.at,
                "actor": self.actor,
                "action": self.action,
                "subject": self.subject,
                "detail": dict(self.detail),
            }
        )

    def chained_to(self, previous: bytes) -> bytes:
        """This entry's hash when it follows an entry hashing to ``previous``."""
        return hashlib.sha256(previous + self.body()).digest()


def verify_chain(entries: Iterable[AuditEntry], *, previous: bytes = GENESIS, first_seq: int = 1) -> bytes:
    """Recompute every link; raise ``LedgerError`` at the first broken one. Returns the last hash."""
    expected = first_seq
    for entry in entries:
        if entry.seq != expected:
            raise LedgerError(f"audit log is missing entry {expected}")
        if not hmac.compare_digest(entry.chained_to(previous), entry.hash):
            raise LedgerError(f"audit log entry {entry.seq} does not match its hash chain")
        previous = entry.hash
        expected += 1
    return previous
