"""Whether an X.509 certificate is valid at an instant: one check, one message, for every chain."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

from enclave.errors import EvidenceError


def check_validity(certificate: x509.Certificate, when: datetime, what: str) -> None:
    """Raise ``EvidenceError`` naming ``what`` unless ``when`` lies within the certificate's validity."""
    if when < certificate.not_valid_before_utc:
        reason = f"not valid before {certificate.not_valid_before_utc.isoformat()}"
    elif when > certificate.not_valid_after_utc:
        reason = f"expired at {certificate.not_valid_after_utc.isoformat()}"
    else:
        return
    raise EvidenceError(f"{what} is not valid at {when.isoformat()}: {reason}")
