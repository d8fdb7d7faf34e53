"""Which verifier checks which platform's evidence."""

from __future__ import annotations

from enclave.attestation.interface import Verifier
from enclave.attestation.sev_snp import SevSnpVerifier
from enclave.attestation.sgx import SgxVerifier
from enclave.attestation.sim import SimVerifier
from enclave.attestation.tdx import TdxVerifier
from enclave.attestation.tpm import TpmVerifier
from enclave.errors import EvidenceError

_VERIFIERS: dict[str, type[Verifier]] = {
    "sim": SimVerifier,
    "sev-snp": SevSnpVerifier,
    "tpm": TpmVerifier,
    "tdx": TdxVerifier,
    "sgx": SgxVerifier,
}

PLATFORMS = tuple(sorted(_VERIFIERS))


def verifier_for(platform: str) -> Verifier:
    try:
        return _VERIFIERS[platform]()
    except KeyError:
        raise EvidenceError(
            f"no verifier for platform {platform!r} (known: {', '.join(PLATFORMS)})"
        ) from None
