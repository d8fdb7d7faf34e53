"""Enrolment: single-use challenges, attested enrolment, and who is calling the gateway.

``enrol`` checks, in the order ``docs/protocol.md`` fixes: the join token
(constant time, against its stored SHA-256), the nonce (known, unexpired,
unused, and consumed by any attempt that names it), the CSR (its signature,
and that its key is the attested key), then the evidence against the
deployment's manifest through ``enclave.attestation.appraise``. Every refusal
is written to the audit log and counted by reason before it is raised.

Platform ``tpm`` adds a credential round before the certificate: the EK
certificate must chain to the manifest's ``[tpm] ek_roots``, and the answer is
a ``TPM2_MakeCredential`` challenge for that EK and the Name of the AK in the
verified evidence. ``activate`` takes the recovered secret (constant-time
compare, single use, expiring with the nonce's lifetime); only then is the
instance admitted, with a client certificate and a certificate for its AK.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from custodian.authority import CertificateAuthority, csr_public_key
from custodian.config import CustodianConfig
from custodian.errors import BusyError, CustodianError, NotFoundError, RefusedError, SuspendedError
from custodian.ledger import InstanceRecord, Ledger
from custodian.metrics import CustodianMetrics
from enclave.attestation import AttestedClaims, Evidence, ReferenceValues, appraise
from enclave.attestation.tpm_ak import load_ak
from enclave.attestation.tpm_credential import make_credential, object_name, verify_ek_certificate
from enclave.collateral._http import CollateralServiceError
from enclave.errors import BindingError, EnclaveError, EvidenceError, FormatError, PolicyError
from enclave.identity import public_key_der

logger = logging.getLogger(__name__)

NONCE_SIZE = 32
CREDENTIAL_SECRET_SIZE = 32
MAX_EK_CHAIN_BYTES = 16 * 1024


@dataclass(frozen=True)
class Enrolled:
    instance_id: str
    certificate_pem: bytes
    enclave_ca_pem: bytes
    offline_grace_seconds: int
    lease_size: int
    zeroize_after_seconds: int
    # Platform tpm: a certificate (PEM) for the AK, by the enclave CA.
    ak_certificate_pem: bytes = b""


@dataclass(frozen=True)
class CredentialChallenge:
    """Platform tpm: what the enclave must activate before it is admitted."""

    challenge_id: str
    credential_blob: bytes
    encrypted_secret: bytes


@dataclass(frozen=True)
class _Pending:
    """An enrolment that passed appraisal and waits for its credential's secret."""

    deployment: str
    secret: bytes
    public_key: ec.EllipticCurvePublicKey
    ak_public: bytes
    expires_at: datetime.datetime


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
        collateral_source: Callable[[bytes], Mapping[str, bytes]] | None = None,
    ) -> None:
        self._ledger = ledger
        self._ca = enclave_ca
        self._config = config
        self._metrics = metrics
        self._collateral = collateral
        self._collateral_source = collateral_source  # blocking I/O: run in a thread
        self._pending: dict[str, _Pending] = {}

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
        self,
        deployment: str,
        *,
        join_token: str,
        evidence: bytes,
        claims: bytes,
        csr: bytes,
        tpm_ek_public: bytes = b"",
        tpm_ek_certificate: bytes = b"",
        tpm_ek_chain: bytes = b"",
    ) -> Enrolled | CredentialChallenge:
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
            reference = ReferenceValues.from_toml(record.manifest)
            tpm = reference.platform == "tpm"
            if tpm:
                stage = "busy"  # before any appraisal work: a full table of challenges refuses at once
                self._make_room(now)
                stage = "attestation"
            collateral = self._collateral
            if self._collateral_source is not None:
                fetched = await asyncio.to_thread(self._collateral_source, evidence)
                collateral = {**(collateral or {}), **fetched}
            appraisal = appraise(
                evidence,
                claims,
                reference,
                now=now,
                nonce=parsed.nonce,
                public_key=key,
                purpose="enrol",
                deployment=deployment,
                require_model=False,
                collateral=collateral,
                tpm_credential=tpm,
            )
            if tpm:
                stage = "ek"
                self._check_ek(reference, tpm_ek_public, tpm_ek_certificate, tpm_ek_chain, now)
                return self._credential(deployment, evidence, tpm_ek_public, public_key, now)
        except (CustodianError, EnclaveError) as exc:
            await self._refuse(deployment, _attestation_reason(exc) if stage == "attestation" else stage, exc)
            raise
        return await self._admit(
            deployment, public_key, platform=appraisal.platform.platform, simulated=appraisal.simulated
        )

    async def activate(self, challenge_id: str, secret: bytes) -> Enrolled:
        """Platform tpm: admit the enclave whose TPM recovered the credential's secret."""
        pending = self._pending.pop(challenge_id, None)
        try:
            if pending is None:
                raise RefusedError("credential challenge is unknown or was already used")
            if not hmac.compare_digest(secret, pending.secret):
                raise RefusedError(
                    "credential activation failed: the AK is not in the same TPM as the certified EK"
                )
        except RefusedError as exc:
            await self._refuse(pending.deployment if pending else "", "credential", exc)
            raise
        return await self._admit(
            pending.deployment,
            pending.public_key,
            platform="tpm",
            simulated=False,
            ak=pending.ak_public,
            expires_at=pending.expires_at,
        )

    def _check_ek(
        self,
        reference: ReferenceValues,
        ek_public: bytes,
        ek_certificate: bytes,
        ek_chain: bytes,
        now: datetime.datetime,
    ) -> None:
        if not reference.tpm_ek_roots:
            raise RefusedError("the manifest names no [tpm] ek_roots: no EK certificate can be trusted")
        if not ek_public or not ek_certificate:
            raise RefusedError("the enclave sent no EK public key or no EK certificate")
        if len(ek_chain) > MAX_EK_CHAIN_BYTES:
            raise RefusedError(f"EK certificate chain is over {MAX_EK_CHAIN_BYTES} bytes")
        try:
            intermediates = x509.load_pem_x509_certificates(ek_chain) if ek_chain else []
        except ValueError:
            raise RefusedError("EK certificate chain is not PEM certificates") from None
        roots = x509.load_pem_x509_certificates(reference.tpm_ek_roots.encode())
        try:
            verify_ek_certificate(
                ek_certificate, ek_public, roots=roots, intermediates=intermediates, now=now
            )
        except EvidenceError as exc:
            raise RefusedError(
                f"EK certificate is not trusted by the manifest's [tpm] ek_roots: {exc}"
            ) from None

    def _credential(
        self,
        deployment: str,
        evidence: bytes,
        ek_public: bytes,
        public_key: ec.EllipticCurvePublicKey,
        now: datetime.datetime,
    ) -> CredentialChallenge:
        # The Name of the AK that signed the verified quote: activation then proves that very key
        # lives in the TPM of the certified EK.
        ak_public = Evidence.from_bytes(evidence).part("ak")
        secret = os.urandom(CREDENTIAL_SECRET_SIZE)
        blob, encrypted = make_credential(ek_public, object_name(ak_public), secret)
        challenge_id = uuid.uuid4().hex
        self._pending[challenge_id] = _Pending(
            deployment=deployment,
            secret=secret,
            public_key=public_key,
            ak_public=ak_public,
            expires_at=now + datetime.timedelta(seconds=self._config.nonce_ttl_seconds),
        )
        logger.info("enrolment to %s: credential challenge %s for the TPM's AK", deployment, challenge_id)
        return CredentialChallenge(challenge_id, blob, encrypted)

    def _make_room(self, now: datetime.datetime) -> None:
        """Forget expired credential challenges; refuse (busy) while too many are still open."""
        for key in [k for k, p in self._pending.items() if now > p.expires_at]:
            del self._pending[key]
        if len(self._pending) >= self._config.max_pending_challenges:
            raise BusyError("too many outstanding credential challenges; try again shortly")

    async def _refuse(self, deployment: str, reason: str, exc: Exception) -> None:
        self._metrics.enrol_refusals.labels(reason).inc()
        async with self._ledger.transaction() as tx:
            await tx.audit("enclave", "enrol.refuse", deployment, {"reason": reason, "detail": str(exc)})
        logger.warning("enrolment to %s refused (%s): %s", deployment, reason, exc)

    async def _admit(
        self,
        deployment: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        platform: str,
        simulated: bool,
        ak: bytes = b"",
        expires_at: datetime.datetime | None = None,
    ) -> Enrolled:
        """Add the instance, in the transaction that checks its deployment is there and not suspended.

        Checked here, not only at the challenge: a nonce issued (or a TPM credential activated)
        before a suspension must not admit an instance after it. Every refusal is audited.
        """
        key = public_key_der(public_key)
        validity = datetime.timedelta(hours=self._config.client_cert_hours)
        try:
            async with self._ledger.transaction() as tx:
                if expires_at is not None and tx.now > expires_at:
                    raise RefusedError("credential challenge has expired")
                record = await tx.deployment(deployment)
                if record is None:
                    raise NotFoundError(f"no deployment {deployment!r}")
                if record.suspended:
                    raise SuspendedError(
                        f"deployment {deployment!r} is suspended; enrol again once it resumes"
                    )
                instance_id = uuid.uuid4().hex
                certificate = self._ca.issue_client(public_key, instance_id, now=tx.now, validity=validity)
                ak_certificate = self._ak_certificate(ak, instance_id, tx.now, validity) if ak else b""
                instance = InstanceRecord(
                    instance_id=instance_id,
                    deployment=deployment,
                    platform=platform,
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
                        "simulated": simulated,
                    },
                )
        except (RefusedError, NotFoundError, SuspendedError) as exc:
            reason = "credential" if isinstance(exc, RefusedError) else "deployment"
            await self._refuse(deployment, reason, exc)
            raise
        self._metrics.enrolments.inc()
        logger.info("instance %s enrolled in %s (%s)", instance_id, deployment, instance.platform)
        return Enrolled(
            instance_id=instance_id,
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
            enclave_ca_pem=self._ca.pem,
            offline_grace_seconds=record.offline_grace_seconds,
            lease_size=record.lease_size,
            zeroize_after_seconds=record.zeroize_after_seconds,
            ak_certificate_pem=ak_certificate,
        )

    def _ak_certificate(
        self, ak: bytes, instance_id: str, now: datetime.datetime, validity: datetime.timedelta
    ) -> bytes:
        ak_key = load_ak(ak).key
        if not isinstance(ak_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise RefusedError("the AK is neither an RSA nor an EC key")
        return self._ca.issue_ak(ak_key, instance_id, now=now, validity=validity).public_bytes(
            serialization.Encoding.PEM
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
    if isinstance(exc, CollateralServiceError):
        return "collateral"
    if isinstance(exc, PolicyError):
        return "policy"
    if isinstance(exc, BindingError):
        return "binding"
    if isinstance(exc, EvidenceError):
        return "evidence"
    return "format"
