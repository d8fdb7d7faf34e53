"""Attestation: one interface, several platforms.

``Attester.collect`` runs inside the enclave; ``Verifier.verify`` runs at the
relying party (custodian and client share it); ``appraise`` ties evidence,
claims binding, measurement-log replay and the manifest's reference values
together and raises on the first thing that does not check out (the policy
step reports every mismatch at once).
"""

from enclave.attestation.appraisal import Appraisal, appraise
from enclave.attestation.claims import AttestedClaims, MeasurementEvent
from enclave.attestation.interface import Attester, Evidence, PlatformClaims, Verifier
from enclave.attestation.manifest import ReferenceValues

__all__ = [
    "Appraisal",
    "AttestedClaims",
    "Attester",
    "Evidence",
    "MeasurementEvent",
    "PlatformClaims",
    "ReferenceValues",
    "Verifier",
    "appraise",
]
