"""The attestation platform interface: evidence, platform claims, attester, verifier.

Every platform (``sim``, later ``tpm``, ``tdx``, ``sev-snp``, ``sgx``) implements
``Attester`` inside the enclave and ``Verifier`` at the relying party. Verifiers
do no I/O: the caller passes evidence, the expected report data, the time and
any collateral.
"""

from __future__ import annotations

import base64
import binascii
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from enclave.errors import EvidenceError

MAX_EVIDENCE_BYTES = 256 * 1024
REPORT_DATA_SIZE = 64


@dataclass(frozen=True)
class Evidence:
    """Platform evidence: the platform's name and its named binary parts."""

    platform: str
    parts: Mapping[str, bytes]

    def to_bytes(self) -> bytes:
        doc = {
            "platform": self.platform,
            "parts": {k: base64.b64encode(v).decode() for k, v in sorted(self.parts.items())},
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_EVIDENCE_BYTES) -> Evidence:
        if len(data) > max_size:
            raise EvidenceError(f"evidence is {len(data)} bytes, over the {max_size}-byte limit")
        try:
            doc = json.loads(data)
            platform = doc["platform"]
            raw_parts = doc["parts"]
            if not isinstance(platform, str) or not isinstance(raw_parts, dict):
                raise TypeError("platform must be a string and parts an object")
            parts = {str(k): base64.b64decode(v, validate=True) for k, v in raw_parts.items()}
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise EvidenceError(f"evidence does not parse: {exc}") from exc
        return cls(platform=platform, parts=parts)

    def part(self, name: str) -> bytes:
        try:
            return self.parts[name]
        except KeyError:
            raise EvidenceError(f"{self.platform} evidence lacks its {name!r} part") from None


@dataclass(frozen=True)
class PlatformClaims:
    """What a verifier established from evidence whose signature checked out."""

    platform: str
    report_data: bytes
    # Measurement registers by name, e.g. "sim.app", "pcr.sha256.15", "rtmr3".
    registers: Mapping[str, bytes]
    simulated: bool
    # The register the measurement log is folded into, and its hash algorithm. None where
    # the platform has no extendable register (SEV-SNP, SGX): there the log is bound only
    # through the report data, and the launch measurement vouches for the code that wrote it.
    log_register: str | None
    log_hash: str
    # Other parsed fields, for display (firmware, TCB status, ...).
    details: Mapping[str, Any] = field(default_factory=dict)


class Attester(ABC):
    """Collects evidence inside the enclave."""

    platform: str
    simulated: bool = False
    # Whether the log register keeps its value when this attester is closed and another is
    # opened on the same machine (a TPM PCR until the TPM resets): then the next instance's log
    # continues the earlier ones (see ``continue_log``) instead of starting from zero.
    register_outlives_attester: bool = False

    def continue_log(self, register_values: Mapping[str, bytes]) -> None:
        """Expect the log register to hold the replay of earlier instances' logs, by hash algorithm.

        Only for a platform whose register outlives the attester; the first ``extend`` then
        checks that the register holds exactly that value.
        """
        raise ValueError(f"the {self.platform} platform's log register starts afresh with each attester")

    @abstractmethod
    def extend(self, event_digests: Mapping[str, bytes]) -> None:
        """Fold one measurement-log event into the platform's log register.

        ``event_digests`` maps hash algorithm names ("sha384", "sha256") to the
        event's digest in that algorithm; the platform picks the bank it uses.
        """

    @abstractmethod
    def collect(self, report_data: bytes) -> Evidence:
        """Evidence over the current registers with ``report_data`` (64 bytes) bound in."""


class Verifier(ABC):
    """Checks one platform's evidence. Raises; never returns a failure value."""

    platform: str

    @abstractmethod
    def verify(
        self,
        evidence: Evidence,
        *,
        report_data: bytes,
        now: datetime,
        collateral: Mapping[str, bytes] | None = None,
    ) -> PlatformClaims:
        """Verify the evidence's signature chain and that it carries ``report_data``."""
