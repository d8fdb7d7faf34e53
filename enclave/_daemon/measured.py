"""The enclave's measured identity: its key, its attester and its measurement log.

Everything the enclave attests to goes through here, so the log the claims
carry is always exactly what was folded into the platform's register.
"""

from __future__ import annotations

import logging
import threading

from cryptography.hazmat.primitives.asymmetric import ec

from enclave._daemon.errors import ConfigError
from enclave.attestation import AttestedClaims, Attester, MeasurementEvent, ReferenceValues, measurement, sim
from enclave.identity import generate_identity_key, public_key_der

logger = logging.getLogger(__name__)

_ATTESTERS: dict[str, type[Attester]] = {sim.PLATFORM: sim.SimAttester}
ATTESTER_PLATFORMS = tuple(sorted(_ATTESTERS))
# Registers a platform sets before the enclave runs, which a manifest pins.
_BOOT_REGISTERS: dict[str, dict[str, str]] = {sim.PLATFORM: {sim.BOOT_REGISTER: sim.BOOT_MEASUREMENT.hex()}}


def attester_for(platform: str) -> Attester:
    try:
        return _ATTESTERS[platform]()
    except KeyError:
        known = ", ".join(ATTESTER_PLATFORMS)
        raise ConfigError(f"no attester for platform {platform!r} (known: {known})") from None


def reference_values(platform: str, custodian_ca_der: bytes) -> ReferenceValues:
    """The manifest of this build on ``platform``, trusting the given custodian CA."""
    if platform not in _ATTESTERS:
        raise ConfigError(f"no manifest for platform {platform!r} (known: {', '.join(ATTESTER_PLATFORMS)})")
    return ReferenceValues(
        platform=platform,
        allow_simulation=_ATTESTERS[platform].simulated,
        custodian_ca_sha256=measurement.custodian_ca_sha256(custodian_ca_der),
        code_sha384=measurement.code_sha384().hex(),
        registers=dict(_BOOT_REGISTERS[platform]),
    )


class MeasuredIdentity:
    """Identity key (generated in memory), attester and the log folded into it."""

    def __init__(
        self, attester: Attester, deployment: str, *, key: ec.EllipticCurvePrivateKey | None = None
    ) -> None:
        self.attester = attester
        self.deployment = deployment
        self.key = key if key is not None else generate_identity_key()
        self.public_key_der = public_key_der(self.key)
        self._log: list[MeasurementEvent] = []
        # Extending and collecting must not interleave: the log must replay to the register.
        self._lock = threading.Lock()

    @property
    def platform(self) -> str:
        return self.attester.platform

    @property
    def log(self) -> tuple[MeasurementEvent, ...]:
        with self._lock:
            return tuple(self._log)

    def measure(self, event: MeasurementEvent) -> None:
        """Extend the platform register with ``event`` and append it to the log."""
        with self._lock:
            self.attester.extend(event.digests())
            self._log.append(event)
        logger.info("measured %s %s", event.kind, event.sha384.hex())

    def attest(self, purpose: str, nonce: bytes) -> tuple[bytes, bytes]:
        """Fresh evidence over claims for ``purpose`` and ``nonce``: (evidence, claims) bytes."""
        with self._lock:
            claims = self._claims(purpose, nonce)
            evidence = self.attester.collect(claims.report_data())
        return evidence.to_bytes(), claims.to_bytes()

    def _claims(self, purpose: str, nonce: bytes) -> AttestedClaims:
        return AttestedClaims(
            nonce=nonce,
            public_key=self.public_key_der,
            deployment=self.deployment,
            platform=self.attester.platform,
            purpose=purpose,
            log=tuple(self._log),
        )
