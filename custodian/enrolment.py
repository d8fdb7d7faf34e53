"""Enrolment: single-use challenges, attested enrolment, and who is calling the gateway.

``enrol`` checks, in the order ``docs/protocol.md`` fixes: the join token
(constant time, against its stored SHA-256), the nonce (known, unexpired,
unused, and consumed by any attempt that names it), the CSR (its signature,
and that its key is the attested key), then the evidence against the
deployment's manifest through ``enclave.attestation.appraise``. Every refusal
is written to the audit log and counted by reason before it is raised.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from custodian.authority import CertificateAuthority, csr_public_key
from custodian.config import CustodianConfig
from custodian.errors import BusyError, CustodianError, NotFoundError, RefusedError, SuspendedError
from custodian.ledger import InstanceRecord, Ledger
from custodian.metrics import CustodianMetrics
from enclave.attestation import AttestedClaims, ReferenceValues, appraise
from enclave.errors import BindingError, EnclaveError, EvidenceError, FormatError, PolicyError
from enclave.identity import public_key_der

logger = logging.getLogger(__name__)

NONCE_SIZE = 32


@dataclass(frozen=True)
class Enrolled:
    instance_id: str
    certificate_pem: bytes
    enclave_ca_pem: bytes
    offline_grace_seconds: int
    lease_size: int
    zeroize_after_seconds: int


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Enrolment:
    def __init__(
        self,
        ledger: Ledger,
        enclave_ca: CertificateAuthority,
        config: CustodianConfig,
        metrics: CustodianMetrics,
        *,
        collateral: Mapping[str, bytes] | None = None,
    ) -> None:
        self._ledger = ledger
        self._ca = enclave_ca
        self._config = config
        self._metrics = metrics
        self._collateral = collateral

    async def challenge(self, deployment: str) -> tuple[bytes, int]:
        """A fresh single-use nonce for ``deployment`` and the seconds it stays valid."""
        ttl = self._config.nonce_ttl_seconds
        async with self._ledger.transaction() as tx:
            record = await tx.deployment(deployment)
            if record is None:
                raise NotFoundError(f"no deployment {deployment!r}")
            if record.suspended:
                raise SuspendedError(f"deployment {deployment!r} is suspended; enrol again once it resumes")
            if await tx.pending_challenges() >= self._config.max_pending_challenges:
                await tx.purge_challenges()
                if await tx.pending_challenges() >= self._config.max_pending_challenges:
                    raise BusyError("too many outstanding challenges; try again shortly")
            nonce = os.urandom(NONCE_SIZE)
            await tx.add_challenge(nonce, deployment, tx.now + datetime.timedelta(seconds=ttl))
        return nonce, ttl

    async def purge_challenges(self) -> int:
        async with self._ledger.transaction() as tx:
            return await tx.purge_challenges()

    async def enrol(
        self, deployment: str, *, join_token: str, evidence: bytes, claims: bytes, csr: bytes
    ) -> Enrolled:
        parsed: AttestedClaims | None = None
        parse_error: FormatError | None = None
        try:
            parsed = AttestedClaims.from_bytes(claims)
        except FormatError as exc:
            parse_error = exc
        # Consume the nonce first, whatever happens next: one attempt per challenge.
        async with self._ledger.transaction() as tx:
            record = await tx.deployment(deployment)
            if record is None:
                raise NotFoundError(f"no deployment {deployment!r}")
            challenge = await tx.take_challenge(parsed.nonce) if parsed else None
            now = tx.now
        stage = "token"
        try:
            if not hmac.compare_digest(token_digest(join_token), record.token_sha256):
                raise RefusedError("join token is not valid for this deployment")
            stage = "format"
            if parsed is None:
                raise parse_error or FormatError("claims do not parse")
            stage = "nonce"
            if challenge is None:
                raise RefusedError("nonce is unknown or was already used")
            challenge_deployment, expires_at = challenge
            if challenge_deployment != deployment:
                raise RefusedError("nonce was issued for another deployment")
            if now > expires_at:
                raise RefusedError("nonce has expired")
            stage = "csr"
            public_key = csr_public_key(csr)
            key = public_key_der(public_key)
            if key != parsed.public_key:
                raise RefusedError("CSR is for another key than the attested one")
            stage = "attestation"
            appraisal = appraise(
                evidence,
                claims,
                ReferenceValues.from_toml(record.manifest),
                now=now,
                nonce=parsed.nonce,
                public_key=key,
                purpose="enrol",
                deployment=deployment,
                require_model=False,
                collateral=self._collateral,
            )
        except (CustodianError, EnclaveError) as exc:
            reason = _attestation_reason(exc) if stage == "attestation" else stage
            self._metrics.enrol_refusals.labels(reason).inc()
            async with self._ledger.transaction() as tx:
                await tx.audit("enclave", "enrol.refuse", deployment, {"reason": reason, "detail": str(exc)})
            logger.warning("enrolment to %s refused (%s): %s", deployment, reason, exc)
            raise
        instance_id = uuid.uuid4().hex
        certificate = self._ca.issue_client(
            public_key,
            instance_id,
            now=now,
            validity=datetime.timedelta(hours=self._config.client_cert_hours),
        )
        async with self._ledger.transaction() as tx:
            instance = InstanceRecord(
                instance_id=instance_id,
                deployment=deployment,
                platform=appraisal.platform.platform,
                public_key=key,
                enrolled_at=tx.now,
                last_seen=tx.now,
                last_seq=0,
            )
            await tx.add_instance(instance)
            await tx.audit(
                "enclave",
                "enrol",
                deployment,
                {
                    "instance": instance_id,
                    "key_sha256": instance.key_sha256,
                    "public_key": base64.b64encode(key).decode(),
                    "platform": instance.platform,
                    "simulated": appraisal.simulated,
                },
            )
        self._metrics.enrolments.inc()
        logger.info("instance %s enrolled in %s (%s)", instance_id, deployment, instance.platform)
        return Enrolled(
            instance_id=instance_id,
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
            enclave_ca_pem=self._ca.pem,
            offline_grace_seconds=record.offline_grace_seconds,
            lease_size=record.lease_size,
            zeroize_after_seconds=record.zeroize_after_seconds,
        )

    async def authenticate(self, instance_id: str, public_key: bytes) -> InstanceRecord:
        """The enrolled instance behind a client certificate; its key must be the one enrolled."""
        async with self._ledger.transaction() as tx:
            instance = await tx.instance(instance_id)
            if instance is None:
                raise RefusedError(f"instance {instance_id} is not enrolled")
            if not hmac.compare_digest(instance.public_key, public_key):
                raise RefusedError(f"instance {instance_id} presented another key than the one enrolled")
            return instance


def _attestation_reason(exc: Exception) -> str:
    """The refusal metric's label for an error raised while appraising the evidence."""
    if isinstance(exc, PolicyError):
        return "policy"
    if isinstance(exc, BindingError):
        return "binding"
    if isinstance(exc, EvidenceError):
        return "evidence"
    return "format"
