"""The impersonation attack on the tpm platform, as an enrolled borrower could mount it.

Any instance the custodian enrols holds a software key with a client
certificate from the custodian's enclave CA. The attacker presents that key as
a TPM's attestation key: a ``TPMS_ATTEST`` it marshals and signs itself, over
PCR values of its choosing (the application PCR replaying its measurement log,
so everything but the AK checks out), with the enclave certificate as the
"AK certificate". ``tpmt_public`` wraps the software key in a ``TPMT_PUBLIC``
claiming every attribute of a TPM-made restricted signing key, which nothing
in the structure itself can disprove.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from enclave.attestation import AttestedClaims
from enclave.attestation.interface import Evidence
from enclave.attestation.tpm import qualifying_data

from .test_tpm_marshal import AK_ENCODINGS, ECDSA, SoftwareTpm, pcr_json

APP_PCR = 15
BOOT_PCRS = list(range(10))  # the classic boot chain up to the OS
SELECTION = [("sha384", [*BOOT_PCRS, APP_PCR])]
FORGED_AK_ENCODINGS = tuple(AK_ENCODINGS)  # tpmt_public, spki, pem, jwk


def forged_tpm(key: ec.EllipticCurvePrivateKey, claims: AttestedClaims) -> SoftwareTpm:
    """A "TPM" whose AK is ``key`` and whose application PCR replays ``claims.log``."""
    tpm = SoftwareTpm(key, ECDSA, "sha256")
    for event in claims.log:
        tpm.extend("sha384", APP_PCR, event.digest("sha384"))
    return tpm


def boot_registers(tpm: SoftwareTpm) -> dict[str, str]:
    """The boot PCRs a manifest pins, as the forged TPM reports them."""
    return {f"pcr.sha384.{i}": tpm.banks["sha384"][i].hex() for i in BOOT_PCRS}


def forged_evidence(
    key: ec.EllipticCurvePrivateKey, claims: AttestedClaims, *, ak_encoding: str, ak_cert: bytes
) -> Evidence:
    """Evidence for ``claims`` quoted by ``key`` posing as an AK, ``ak_cert`` as its certificate."""
    tpm = forged_tpm(key, claims)
    message, signature = tpm.quote(qualifying_data(claims.report_data()), SELECTION)
    return Evidence(
        platform="tpm",
        parts={
            "quote": message,
            "signature": signature,
            "ak": AK_ENCODINGS[ak_encoding](tpm),
            "pcrs": pcr_json(tpm.values(SELECTION)),
            "ak_cert": ak_cert,
        },
    )
