"""Attested claims: the document whose SHA-512 is the evidence's report data.

The claims carry the verifier's nonce, the enclave's public key, the deployment
and the measurement log, so one piece of evidence proves all four at once.
Canonical form: JSON, sorted keys, no whitespace, UTF-8.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from enclave.errors import FormatError

MAX_CLAIMS_BYTES = 64 * 1024
CLAIMS_FORMAT = "custos-claims/1"
EVENT_KINDS = ("instance", "code", "config", "model")
# Opens each enclave instance's entries. A register that outlives an instance (a TPM PCR until
# the TPM resets) keeps every earlier instance's entries before it, and the verifier replays them all.
INSTANCE_KIND = "instance"
PURPOSES = ("enrol", "tls", "attest")


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class MeasurementEvent:
    """One entry of the measurement log: what was measured and its SHA-384."""

    kind: str
    sha384: bytes
    detail: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sha384": self.sha384.hex(), "detail": dict(self.detail)}

    def digest(self, algorithm: str) -> bytes:
        """The value extended into a register: H(canonical event)."""
        return hashlib.new(algorithm, canonical_json(self.to_json())).digest()

    def digests(self) -> dict[str, bytes]:
        return {alg: self.digest(alg) for alg in ("sha384", "sha256", "sha1")}

    @classmethod
    def from_json(cls, doc: Any) -> MeasurementEvent:
        if not isinstance(doc, dict):
            raise FormatError("measurement event must be an object")
        kind, digest, detail = doc.get("kind"), doc.get("sha384"), doc.get("detail", {})
        if kind not in EVENT_KINDS:
            raise FormatError(f"measurement event kind {kind!r} is not one of {EVENT_KINDS}")
        if not isinstance(detail, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in detail.items()
        ):
            raise FormatError("measurement event detail must map strings to strings")
        return cls(kind=kind, sha384=_hex(digest, 48, "measurement event sha384"), detail=detail)


def replay(events: tuple[MeasurementEvent, ...], algorithm: str) -> bytes:
    """Fold the log into a register the way a TPM PCR or TDX RTMR extends."""
    size = hashlib.new(algorithm).digest_size
    register = bytes(size)
    for event in events:
        register = hashlib.new(algorithm, register + event.digest(algorithm)).digest()
    return register


@dataclass(frozen=True)
class AttestedClaims:
    nonce: bytes
    public_key: bytes  # SubjectPublicKeyInfo, DER
    deployment: str
    platform: str
    purpose: str
    log: tuple[MeasurementEvent, ...]

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "format": CLAIMS_FORMAT,
                "nonce": self.nonce.hex(),
                "public_key": self.public_key.hex(),
                "deployment": self.deployment,
                "platform": self.platform,
                "purpose": self.purpose,
                "log": [e.to_json() for e in self.log],
            }
        )

    def report_data(self) -> bytes:
        return hashlib.sha512(self.to_bytes()).digest()

    def instance_log(self) -> tuple[MeasurementEvent, ...]:
        """The current instance's entries: from the last ``instance`` event on (all of a log without one)."""
        starts = [i for i, e in enumerate(self.log) if e.kind == INSTANCE_KIND]
        return self.log[starts[-1] :] if starts else self.log

    def events(self, kind: str) -> list[MeasurementEvent]:
        """The current instance's events of ``kind`` (earlier instances' entries only replay)."""
        return [e for e in self.instance_log() if e.kind == kind]

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_CLAIMS_BYTES) -> AttestedClaims:
        if len(data) > max_size:
            raise FormatError(f"claims are {len(data)} bytes, over the {max_size}-byte limit")
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise FormatError(f"claims are not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != CLAIMS_FORMAT:
            raise FormatError(f"claims are not in the {CLAIMS_FORMAT} format")
        purpose, deployment, platform = doc.get("purpose"), doc.get("deployment"), doc.get("platform")
        if purpose not in PURPOSES:
            raise FormatError(f"claims purpose {purpose!r} is not one of {PURPOSES}")
        if not isinstance(deployment, str) or not isinstance(platform, str):
            raise FormatError("claims deployment and platform must be strings")
        log = doc.get("log")
        if not isinstance(log, list):
            raise FormatError("claims log must be a list")
        claims = cls(
            nonce=_hex(doc.get("nonce"), None, "claims nonce"),
            public_key=_hex(doc.get("public_key"), None, "claims public key"),
            deployment=deployment,
            platform=platform,
            purpose=purpose,
            log=tuple(MeasurementEvent.from_json(e) for e in log),
        )
        if claims.to_bytes() != data:
            raise FormatError("claims are not in canonical form")
        return claims


def _hex(value: Any, size: int | None, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise FormatError(f"{what} is not valid hex") from None
    if size is not None and len(raw) != size:
        raise FormatError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw
