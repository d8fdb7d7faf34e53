"""Enrolment: single-use challenges, attested enrolment, and who is calling the gateway.

``enrol`` checks, in the order ``docs/protocol.md`` fixes: the join token
(constant time, against its stored SHA-256), the nonce (issued by this
process for this deployment, unexpired, unused, and spent by any attempt that
gets past the token), the CSR (its signature, and that its key is the attested
key), then the evidence against the deployment's manifest through
``enclave.attestation.appraise``. Challenges are stateless
(``custodian.challenges``): nothing an unauthenticated caller does fills a
table. Every refusal is counted by reason; a rate-limited sample of them is
written to the audit log, per caller's address while the caller has not shown
the join token, per deployment once it has.

Platform ``tpm`` adds a credential round before the certificate: the EK
certificate must chain to the manifest's ``[tpm] ek_roots``, and the answer is
a ``TPM2_MakeCredential`` challenge for that EK and the Name of the AK in the
verified evidence, its id the sealed pending enrolment. ``activate`` takes the
recovered secret (constant-time compare, single use, expiring with the nonce's
lifetime); only then is the instance admitted, with a client certificate and a
certificate for its AK, and the ``on_admitted`` hook told of the evidence its
enrolment was appraised on (kept meanwhile by ``custodian.appraisals``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from custodian.appraisals import Appraised, PendingAppraisals
from custodian.authority import CertificateAuthority, csr_public_key
from custodian.challenges import Challenges, spent_key
from custodian.collateral import CollateralSource
from custodian.config import CustodianConfig
from custodian.endorsement import check_ek
from custodian.errors import CustodianError, NotFoundError, RefusedError, SuspendedError
from custodian.ledger import InstanceRecord, Ledger
from custodian.metrics import CustodianMetrics
from custodian.throttle import AuditSampler, Rate
from enclave.attestation import AttestedClaims, Evidence, ReferenceValues, appraise
from enclave.attestation.appraisal import Appraisal
from enclave.attestation.tpm_ak import load_ak
from enclave.attestation.tpm_credential import make_credential, object_name
from enclave.collateral._http import CollateralServiceError
from enclave.errors import BindingError, EnclaveError, EvidenceError, PolicyError
from enclave.identity import public_key_der

logger = logging.getLogger(__name__)

CREDENTIAL_SECRET_SIZE = 32
# Longest deployment name (``custodian.config.check_name``); a longer one names no deployment.
MAX_DEPLOYMENT_NAME = 64
# What of a caller's text an error, a log line or an audit entry repeats.
SHOWN_CHARS = 64
MAX_REFUSAL_DETAIL = 256
# Refusals written to the audit log: a burst, then one per interval, per address (before the join
# token) or per deployment (after it); the rest are counted in custos_custodian_audit_skipped_total.
ANONYMOUS_SAMPLES = (5, 1 / 10)
DEPLOYMENT_SAMPLES = (20, 1 / 2)


@dataclass(frozen=True)
class Enrolled:
    instance_id: str
    certificate_pem: bytes
    enclave_ca_pem: bytes
    offline_grace_seconds: int
    lease_size: int
    zeroize_after_seconds: int
    # Platform tpm: a certificate (PEM) for the AK, by the AK CA.
    ak_certificate_pem: bytes = b""


@dataclass(frozen=True)
class CredentialChallenge:
    """Platform tpm: what the enclave must activate before it is admitted."""

    challenge_id: str
    credential_blob: bytes
    encrypted_secret: bytes


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
        collateral: CollateralSource | None = None,
        challenges: Challenges | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        ak_ca: CertificateAuthority,
    ) -> None:
        self._ledger = ledger
        self._ca = enclave_ca
        self._ak_ca = ak_ca  # never the enclave CA: that one certifies software keys
        self._config = config
        self._metrics = metrics
        self._collateral = collateral
        self._challenges = challenges or Challenges(ttl_seconds=config.nonce_ttl_seconds)
        # Told of each instance admitted on its evidence (the web console shows it); a tpm
        # instance's appraisal waits for its credential's activation in ``_appraised``.
        self.on_admitted: Callable[[str, bytes, bytes, Appraisal], None] | None = None
        self._appraised = PendingAppraisals()
        skipped = metrics.audit_skipped.labels("enrol").inc
        self._anonymous = AuditSampler(_rate(ANONYMOUS_SAMPLES, monotonic), skipped)
        self._known = AuditSampler(_rate(DEPLOYMENT_SAMPLES, monotonic), skipped)

    async def challenge(self, deployment: str) -> tuple[bytes, int]:
        """A fresh single-use nonce for ``deployment`` and the seconds it stays valid.

        An unknown and a suspended deployment get the same answer: whether a deployment is
        suspended is not for an anonymous caller to learn.
        """
        async with self._ledger.transaction() as tx:
            record = await tx.deployment(deployment) if len(deployment) <= MAX_DEPLOYMENT_NAME else None
            now = tx.now
        if record is None or record.suspended:
            raise _not_open()
        return self._challenges.nonce(deployment, now), self._config.nonce_ttl_seconds

    async def purge_challenges(self) -> int:
        """Forget spent challenges expired for a while (their expiry refuses them, on every replica)."""
        async with self._ledger.transaction() as tx:
            return await tx.purge_spent()

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
        source: str = "",
    ) -> Enrolled | CredentialChallenge:
        async with self._ledger.transaction() as tx:
            record = await tx.deployment(deployment) if len(deployment) <= MAX_DEPLOYMENT_NAME else None
            now = tx.now
        if record is None:
            unknown = _not_open()
            await self._refuse(deployment, "deployment", unknown, anonymous=source)
            raise unknown
        if not hmac.compare_digest(token_digest(join_token), record.token_sha256):
            bad_token = RefusedError("join token is not valid for this deployment")
            await self._refuse(deployment, "token", bad_token, anonymous=source)
            raise bad_token
        stage = "format"
        try:
            parsed = AttestedClaims.from_bytes(claims)
            stage = "nonce"
            # Spent by any attempt that gets this far: one attempt per challenge.
            expires_at = self._challenges.check_nonce(parsed.nonce, deployment, now)
            async with self._ledger.transaction() as tx:
                if not await tx.spend(spent_key("nonce", parsed.nonce), expires_at):
                    raise RefusedError("nonce is unknown or was already used")
            stage = "csr"
            public_key = csr_public_key(csr)
            key = public_key_der(public_key)
            if key != parsed.public_key:
                raise RefusedError("CSR is for another key than the attested one")
            stage = "attestation"
            reference = ReferenceValues.from_toml(record.manifest)
            tpm = reference.platform == "tpm"
            # Our own copy of the platform's collateral (blocking I/O: a worker thread); the verifier
            # uses it where it is fresher than what the evidence carries.
            collateral = await asyncio.to_thread(self._collateral, evidence) if self._collateral else None
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
                check_ek(reference, tpm_ek_public, tpm_ek_certificate, tpm_ek_chain, now)
                challenge = self._credential(deployment, evidence, tpm_ek_public, key, now)
                if self.on_admitted is not None:
                    sealed = self._challenges.open_credential(challenge.challenge_id, now)
                    kept = Appraised(evidence, claims, appraisal, sealed.expires_at)
                    self._appraised.keep(sealed.spent_key, kept, now)
                return challenge
        except (CustodianError, EnclaveError) as exc:
            await self._refuse(deployment, _attestation_reason(exc) if stage == "attestation" else stage, exc)
            raise
        enrolled = await self._admit(
            deployment, public_key, platform=appraisal.platform.platform, simulated=appraisal.simulated
        )
        if self.on_admitted is not None:
            self.on_admitted(enrolled.instance_id, evidence, claims, appraisal)
        return enrolled

    async def activate(self, challenge_id: str, secret: bytes, *, source: str = "") -> Enrolled:
        """Platform tpm: admit the enclave whose TPM recovered the credential's secret."""
        try:
            pending = self._challenges.open_credential(challenge_id, self._ledger.now())
        except RefusedError as exc:
            await self._refuse("", "credential", exc, anonymous=source)
            raise
        spent = (pending.spent_key, pending.expires_at)
        appraised = self._appraised.take(pending.spent_key, self._ledger.now())  # one attempt, too
        if not hmac.compare_digest(secret, pending.secret):
            error = RefusedError(
                "credential activation failed: the AK is not in the same TPM as the certified EK"
            )
            async with self._ledger.transaction() as tx:
                await tx.spend(*spent)  # one attempt per credential, as per nonce
            await self._refuse(pending.deployment, "credential", error)
            raise error
        public_key = serialization.load_der_public_key(pending.public_key)
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # only an EC key was ever sealed
        enrolled = await self._admit(
            pending.deployment, public_key, platform="tpm", simulated=False, ak=pending.ak_public, spend=spent
        )
        if self.on_admitted is not None and appraised is not None:
            self.on_admitted(enrolled.instance_id, appraised.evidence, appraised.claims, appraised.appraisal)
        return enrolled

    def _credential(
        self,
        deployment: str,
        evidence: bytes,
        ek_public: bytes,
        public_key: bytes,
        now: datetime.datetime,
    ) -> CredentialChallenge:
        # The Name of the AK that signed the verified quote: activation then proves that very key
        # lives in the TPM of the certified EK.
        ak_public = Evidence.from_bytes(evidence).part("ak")
        secret = os.urandom(CREDENTIAL_SECRET_SIZE)
        blob, encrypted = make_credential(ek_public, object_name(ak_public), secret)
        challenge_id = self._challenges.seal_credential(deployment, secret, public_key, ak_public, now)
        logger.info("enrolment to %s: credential challenge for the TPM's AK", deployment)
        return CredentialChallenge(challenge_id, blob, encrypted)

    async def _refuse(
        self, deployment: str, reason: str, exc: Exception, *, anonymous: str | None = None
    ) -> None:
        """Count the refusal; audit and log a sample (per address when ``anonymous``, else per deployment).

        ``anonymous`` is the caller's address where it has not shown the deployment's join token.
        """
        self._metrics.enrol_refusals.labels(reason).inc()
        shown = shown_name(deployment)
        if anonymous is None:
            left_out = self._known.sample(deployment)
        else:
            left_out = self._anonymous.sample(anonymous)
        if left_out is None:
            logger.debug("enrolment to %s refused (%s), not audited: over the sample rate", shown, reason)
            return
        detail: dict[str, str | int | bool] = {"reason": reason, "detail": str(exc)[:MAX_REFUSAL_DETAIL]}
        if anonymous is not None:
            detail["source"] = anonymous[:SHOWN_CHARS]
        if left_out:
            detail["left_out"] = left_out
        async with self._ledger.transaction() as tx:
            await tx.audit("enclave", "enrol.refuse", shown, detail)
        logger.warning("enrolment to %s refused (%s): %s", shown, reason, detail["detail"])

    async def _admit(
        self,
        deployment: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        platform: str,
        simulated: bool,
        ak: bytes = b"",
        spend: tuple[bytes, datetime.datetime] | None = None,
    ) -> Enrolled:
        """Add the instance, in the transaction that checks its deployment is there and not suspended.

        Checked here, not only at the challenge: a nonce issued (or a TPM credential activated)
        before a suspension must not admit an instance after it. ``spend`` (a credential
        challenge's key and expiry) is recorded as used in the same transaction. Every refusal
        is audited.
        """
        key = public_key_der(public_key)
        validity = datetime.timedelta(hours=self._config.client_cert_hours)
        try:
            async with self._ledger.transaction() as tx:
                if spend is not None and not await tx.spend(*spend):
                    raise RefusedError("credential challenge is unknown or was already used")
                record = await tx.deployment(deployment)
                if record is None or record.suspended:
                    raise _not_open()
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
        return self._ak_ca.issue_ak(ak_key, instance_id, now=now, validity=validity).public_bytes(
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


def shown_name(name: str) -> str:
    """A caller's name as errors, logs and the audit log repeat it: at most ``SHOWN_CHARS`` characters."""
    return name if len(name) <= SHOWN_CHARS else name[:SHOWN_CHARS] + "..."


def _not_open() -> SuspendedError:
    """The one answer, word for word, for a deployment that is unknown or suspended: they must not
    be told apart (the caller knows which name it asked for)."""
    return SuspendedError("this deployment is not open for enrolment: unknown, or suspended until it resumes")


def _rate(sample: tuple[int, float], monotonic: Callable[[], float]) -> Rate:
    burst, per_second = sample
    return Rate(burst=burst, per_second=per_second, clock=monotonic)


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
