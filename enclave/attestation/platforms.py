"""Which verifier checks which platform's evidence."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from enclave.attestation import nitro
from enclave.attestation.interface import Verifier
from enclave.attestation.manifest import ReferenceValues
from enclave.attestation.sev_snp import SevSnpVerifier
from enclave.attestation.sgx import SgxVerifier
from enclave.attestation.sim import SimVerifier
from enclave.attestation.tdx import TdxVerifier
from enclave.attestation.tpm import TpmVerifier
from enclave.attestation.tpm_ak import load_certificates
from enclave.errors import EvidenceError

_VERIFIERS: dict[str, Callable[[], Verifier]] = {
    "sim": SimVerifier,
    nitro.PLATFORM_ENCLAVE: partial(nitro.NitroVerifier, nitro.PLATFORM_ENCLAVE),
    nitro.PLATFORM_TPM: partial(nitro.NitroVerifier, nitro.PLATFORM_TPM),
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


def manifest_verifier(reference: ReferenceValues, *, trust_ak: bool = False, live: bool = True) -> Verifier:
    """The verifier for the manifest's platform, set as the manifest says: debug TDs and
    enclaves as ``allow_debug`` allows, DCAP collateral no older than
    ``min_tcb_evaluation_data_number``, the TPM's application PCR, and its AK roots unless
    ``trust_ak`` (the caller trusts the AK by other means: credential activation).

    ``live``: the evidence was made for this call (bound to the caller's nonce), so a Nitro
    document must be recent; evidence made earlier (a certificate's) need only not be from the
    future, and its chain valid at its own time."""
    platform = reference.platform
    if platform in nitro.PLATFORMS:
        return nitro.NitroVerifier(
            platform,
            allow_debug=reference.allow_debug,
            max_age=nitro.LIVE_MAX_AGE if live else None,
        )
    if platform in ("tdx", "sgx"):
        dcap = TdxVerifier if platform == "tdx" else SgxVerifier
        return dcap(
            allow_debug=reference.allow_debug,
            min_tcb_evaluation_data_number=reference.min_tcb_evaluation_data_number,
        )
    if platform == "tpm":
        roots = () if trust_ak or not reference.tpm_ak_roots else reference.tpm_ak_roots.encode()
        return TpmVerifier(
            app_pcr=reference.tpm_app_pcr,
            ak_roots=load_certificates(roots, "manifest [tpm] ak_roots") if roots else (),
            # Whether by certificate or by credential activation, trust in the AK needs its
            # TPMT_PUBLIC: a bare key shows nothing of a TPM.
            require_tpm_public=True,
        )
    return verifier_for(platform)
