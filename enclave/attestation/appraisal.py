"""Appraise evidence end to end: parse, bind, verify, replay, check policy."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from enclave.attestation import policy
from enclave.attestation.claims import AttestedClaims, replay
from enclave.attestation.interface import Evidence, PlatformClaims
from enclave.attestation.manifest import UNMEASURED_OS_WARNING, ReferenceValues
from enclave.attestation.platforms import manifest_verifier
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.errors import BindingError, EvidenceError, PolicyError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Appraisal:
    """Evidence that passed: the claims it binds and what the platform reported."""

    claims: AttestedClaims
    platform: PlatformClaims

    @property
    def simulated(self) -> bool:
        return self.platform.simulated

    @property
    def model_sha384(self) -> bytes | None:
        models = self.claims.events("model")
        return models[0].sha384 if models else None


def appraise(
    evidence: bytes,
    claims: bytes,
    reference: ReferenceValues,
    *,
    now: datetime,
    nonce: bytes | None,
    public_key: bytes | None,
    purpose: str,
    deployment: str | None = None,
    require_model: bool = False,
    collateral: Mapping[str, bytes] | None = None,
    tpm_credential: bool = False,
) -> Appraisal:
    """Raise an ``AttestationError`` subclass naming the first failed step.

    ``nonce`` and ``public_key`` are what the relying party expects the claims
    to carry; ``None`` skips that comparison (only for a certificate's embedded
    evidence, whose freshness a later ``Attest(nonce)`` call establishes).

    For ``tpm`` evidence the AK must be certified by one of the manifest's
    ``[tpm] ak_roots``; ``tpm_credential`` waives that for a caller that
    establishes trust in the AK itself, by credential activation against an
    EK certificate (the custodian at enrolment), before relying on the result.
    """
    parsed_evidence = Evidence.from_bytes(evidence)
    parsed_claims = AttestedClaims.from_bytes(claims)
    if parsed_evidence.platform != reference.platform:
        raise PolicyError(
            [f"platform is {parsed_evidence.platform!r}, manifest expects {reference.platform!r}"]
        )
    if parsed_evidence.platform == "sim" and not reference.allow_simulation:
        raise PolicyError(["evidence is simulated and the manifest does not allow simulation"])
    if parsed_claims.platform != parsed_evidence.platform:
        raise BindingError("claims name a different platform than the evidence")
    if parsed_claims.purpose != purpose:
        raise BindingError(f"claims are for {parsed_claims.purpose!r}, expected {purpose!r}")
    if nonce is not None and not hmac.compare_digest(parsed_claims.nonce, nonce):
        raise BindingError("claims do not carry the expected nonce")
    if public_key is not None and parsed_claims.public_key != public_key:
        raise BindingError("claims are for another public key")
    if deployment is not None and parsed_claims.deployment != deployment:
        raise BindingError(f"claims are for deployment {parsed_claims.deployment!r}, expected {deployment!r}")

    verifier = manifest_verifier(reference, trust_ak=tpm_credential, live=nonce is not None)
    platform_claims = verifier.verify(
        parsed_evidence, report_data=parsed_claims.report_data(), now=now, collateral=collateral
    )
    if platform_claims.log_register is not None:
        register = platform_claims.registers.get(platform_claims.log_register)
        if register is None:
            raise EvidenceError(f"evidence lacks the log register {platform_claims.log_register}")
        if replay(parsed_claims.log, platform_claims.log_hash) != register:
            raise BindingError(f"measurement log does not replay to register {platform_claims.log_register}")
    policy.check(
        parsed_claims,
        platform_claims,
        reference,
        require_model=require_model,
        ak_trust_by_credential=tpm_credential,
    )
    if platform_claims.simulated:
        logger.warning(SIMULATION_WARNING)
    if reference.allow_unmeasured_os:
        logger.warning(UNMEASURED_OS_WARNING)
    return Appraisal(claims=parsed_claims, platform=platform_claims)
