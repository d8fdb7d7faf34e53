"""A TPM's endorsement key: its certificate checked against the manifest's ``[tpm] ek_roots``.

Enrolment on the tpm platform (``custodian.enrolment``) trusts an EK only through
a certificate that chains to the roots the deployment's manifest names, with at
most ``MAX_EK_CHAIN_BYTES`` of intermediates; every failure is a ``RefusedError``.
"""

from __future__ import annotations

import datetime

from cryptography import x509

from custodian.errors import RefusedError
from enclave.attestation import ReferenceValues
from enclave.attestation.tpm_credential import verify_ek_certificate
from enclave.errors import EvidenceError

MAX_EK_CHAIN_BYTES = 16 * 1024


def check_ek(
    reference: ReferenceValues,
    ek_public: bytes,
    ek_certificate: bytes,
    ek_chain: bytes,
    now: datetime.datetime,
) -> None:
    """The EK certificate, against the manifest's ``[tpm] ek_roots``; ``RefusedError`` if not trusted."""
    if not reference.tpm_ek_roots:
        raise RefusedError("the manifest names no [tpm] ek_roots: no EK certificate can be trusted")
    if not ek_public or not ek_certificate:
        raise RefusedError("the enclave sent no EK public key or no EK certificate")
    if len(ek_chain) > MAX_EK_CHAIN_BYTES:
        raise RefusedError(f"EK certificate chain is over {MAX_EK_CHAIN_BYTES} bytes")
    try:
        intermediates = x509.load_pem_x509_certificates(ek_chain) if ek_chain else []
    except (ValueError, x509.InvalidVersion):
        raise RefusedError("EK certificate chain is not PEM certificates") from None
    roots = x509.load_pem_x509_certificates(reference.tpm_ek_roots.encode())
    try:
        verify_ek_certificate(ek_certificate, ek_public, roots=roots, intermediates=intermediates, now=now)
    except EvidenceError as exc:
        raise RefusedError(f"EK certificate is not trusted by the manifest's [tpm] ek_roots: {exc}") from None
