"""Errors of the enclave's public modules: one base class, one subclass per domain."""

from __future__ import annotations


class EnclaveError(Exception):
    """Base of every error raised by the ``enclave`` package."""

    def diagnostics(self) -> str:
        """A human-readable explanation, one or more lines."""
        return str(self)


class EnvelopeError(EnclaveError):
    """A model envelope or a wrapped key failed authentication.

    Deliberately opaque: every decryption failure (wrong key, flipped byte,
    reordered or missing chunk, truncation) raises this with the same message.
    """

    def __init__(self) -> None:
        super().__init__("model envelope failed authentication")


class FormatError(EnclaveError):
    """Input that does not parse (wrong size, bad encoding, missing field)."""


class AttestationError(EnclaveError):
    """Evidence was refused. The message names what did not check out."""


class EvidenceError(AttestationError):
    """The evidence itself is malformed or its signature does not verify."""


class EventLogError(EvidenceError):
    """A TCG event log does not parse, or does not replay to the registers it should."""


class BindingError(AttestationError):
    """The evidence is not bound to the expected claims, nonce or key."""


class PolicyError(AttestationError):
    """Claims do not match the reference values. Lists every mismatch."""

    def __init__(self, mismatches: list[str]) -> None:
        self.mismatches = list(mismatches)
        super().__init__("; ".join(self.mismatches))

    def diagnostics(self) -> str:
        return "reference values not met:\n" + "\n".join(f"  - {m}" for m in self.mismatches)


class ManifestError(EnclaveError):
    """A manifest (reference values file) is malformed or empty."""


class ReceiptError(EnclaveError):
    """A usage receipt was refused; ``reason`` names the check that failed.

    Reasons: ``format`` (does not parse or is not canonical), ``signature``
    (not signed by the instance's key), ``binding`` (names another deployment,
    instance, lease or model, or disagrees with the report it came with),
    ``replay`` (a sequence number already used), ``sequence`` (a gap: a receipt
    is missing or out of order) and ``chain`` (does not hash-link to the
    previous receipt).
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
