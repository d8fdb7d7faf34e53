"""The evidence each instance enrolled with, kept in memory for the enclave page.

The ledger keeps no evidence (an instance is its key and its receipts), so the
console keeps the evidence, the claims and what the verifier found for the
instances admitted since this custodian started, the newest ``MAX_INSTANCES``.
A tpm instance is recorded when it is admitted, at credential activation, with
the evidence appraised at its enrolment (``custodian.appraisals``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from enclave.attestation.appraisal import Appraisal

MAX_INSTANCES = 1024


@dataclass(frozen=True)
class Enrolled:
    evidence: bytes
    claims: bytes
    appraisal: Appraisal

    def to_json(self) -> dict[str, Any]:
        platform = self.appraisal.platform
        return {
            "platform": platform.platform,
            "simulated": platform.simulated,
            "registers": {name: value.hex() for name, value in sorted(platform.registers.items())},
            "log_register": platform.log_register or "",
            "details": {k: str(v) for k, v in sorted(platform.details.items())},
            "log": [event.to_json() for event in self.appraisal.claims.log],
            "evidence_bytes": len(self.evidence),
        }


class EvidenceBook:
    def __init__(self) -> None:
        self._book: collections.OrderedDict[str, Enrolled] = collections.OrderedDict()

    def record(self, instance_id: str, evidence: bytes, claims: bytes, appraisal: Appraisal) -> None:
        self._book[instance_id] = Enrolled(evidence, claims, appraisal)
        while len(self._book) > MAX_INSTANCES:
            self._book.popitem(last=False)

    def get(self, instance_id: str) -> Enrolled | None:
        return self._book.get(instance_id)
