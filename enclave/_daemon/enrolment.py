"""Enrolment: prove to the custodian what this enclave is, and get a client certificate.

The enclave dials the custodian's enrolment listener over TLS, pinning the
custodian CA from its measured configuration, asks for a challenge, and
answers with evidence over claims holding that nonce, its public key, the
deployment and its measurement log, plus a CSR for the same key and the join
token. What comes back opens the mutual-TLS gateway.

On the tpm platform the request also carries the EK public key and
certificate; the custodian answers with a credential for that EK and the
evidence's AK, which the TPM activates, and the recovered secret goes back in
``ActivateCredential``. Its answer holds the certificate, and a certificate
for the AK that all later evidence carries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import string
import time
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave._daemon.config import DaemonConfig, parse_address
from enclave._daemon.custodian_tls import check_custodian_certificate
from enclave._daemon.errors import (
    CustodianUnreachableError,
    DaemonError,
    DeploymentSuspendedError,
    EnrolmentRefusedError,
    ProtocolError,
    TpmDeviceError,
)
from enclave._daemon.measured import MeasuredIdentity
from enclave._daemon.tpm_device import TpmAttester
from enclave.errors import EvidenceError
from enclave.identity import ENCLAVE_TLS_NAME, private_key_pem, public_key_der
from protos import custos_pb2, custos_pb2_grpc

logger = logging.getLogger(__name__)

CUSTODIAN_TLS_NAME = "custodian.custos"
# Without a zeroize-after from the custodian: this many offline graces.
ZEROIZE_GRACES = 4
_NONCE_SIZES = range(16, 65)
_MAX_INSTANCE_ID = 128
_INSTANCE_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")
# Codes with which the custodian says no, as opposed to not answering at all.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


@dataclass(frozen=True)
class Enrolment:
    """What the custodian issued: this instance's id, certificate and gateway."""

    instance_id: str
    certificate_pem: bytes
    offline_grace: int
    lease_size: int
    gateway: str  # HOST:PORT of the mutual-TLS gateway
    # The enrolment address (one of --custodian's) that issued it.
    custodian: str = ""
    # Seconds without a renewed lease (or suspended past the grace) before zeroizing.
    zeroize_after: int = 0


def channel_options(config: DaemonConfig) -> list[tuple[str, str | int]]:
    return [("grpc.ssl_target_name_override", CUSTODIAN_TLS_NAME), *config.grpc_options]


def gateway_credentials(
    config: DaemonConfig, identity: MeasuredIdentity, enrolment: Enrolment
) -> grpc.ChannelCredentials:
    """Mutual TLS: the pinned custodian CA, and the certificate issued for the identity key."""
    return grpc.ssl_channel_credentials(
        root_certificates=config.custodian_ca_pem,
        private_key=private_key_pem(identity.key),
        certificate_chain=enrolment.certificate_pem,
    )


async def enrol(config: DaemonConfig, identity: MeasuredIdentity) -> Enrolment:
    """Enrol, or raise ``EnrolmentRefusedError`` (with the reason) or ``CustodianUnreachableError``.

    The custodian's addresses (its replicas) are tried in order, each once at first, so a replica
    that is gone costs one failed connection, not the connect timeout; then, all of them
    unreachable, each again for up to the connect timeout (a custodian still starting). A refusal
    is final. A custodian that answers busy (``RESOURCE_EXHAUSTED``) is asked again from a new
    challenge, with backoff and jitter, for as long as it keeps answering: busy is not a refusal.
    """
    addresses = config.custodians
    if len(addresses) > 1:
        for number, address in enumerate(addresses, 1):
            try:
                return await _enrol_at(config, identity, address, patience=0.0)
            except CustodianUnreachableError as exc:
                then = "the next custodian address" if number < len(addresses) else "each again, waiting"
                logger.warning("%s; trying %s", exc, then)
    for number, address in enumerate(addresses, 1):
        try:
            return await _enrol_at(config, identity, address, patience=config.connect_timeout)
        except CustodianUnreachableError as exc:
            if number == len(addresses):
                raise
            logger.warning("%s; trying the next custodian address, %s", exc, addresses[number])
    raise AssertionError("unreachable: the configuration holds at least one address")


async def _enrol_at(
    config: DaemonConfig, identity: MeasuredIdentity, address: str, *, patience: float
) -> Enrolment:
    delay = config.reconnect_initial
    jitter = random.Random()  # noqa: S311 -- jitter, not a secret
    while True:
        try:
            return await _enrol_once(config, identity, address, patience)
        except _CustodianBusyError as exc:
            wait = jitter.uniform(delay / 2, delay)
            logger.warning("custodian busy (%s), enrolling again in %.1f s", exc, wait)
        await asyncio.sleep(wait)
        delay = min(delay * 2, config.reconnect_max)


class _CustodianBusyError(Exception):
    """The custodian answered ``RESOURCE_EXHAUSTED``: try the whole enrolment again later."""


async def _enrol_once(
    config: DaemonConfig, identity: MeasuredIdentity, address: str, patience: float
) -> Enrolment:
    credentials = grpc.ssl_channel_credentials(root_certificates=config.custodian_ca_pem)
    async with grpc.aio.secure_channel(address, credentials, options=channel_options(config)) as channel:
        stub = custos_pb2_grpc.EnclaveGatewayStub(channel)
        challenge = await _challenge(stub, config, address, patience)
        if len(challenge.nonce) not in _NONCE_SIZES:
            raise ProtocolError(f"custodian challenge nonce is {len(challenge.nonce)} bytes")
        evidence, claims = await asyncio.to_thread(identity.attest, "enrol", challenge.nonce)
        request = custos_pb2.EnrolRequest(
            deployment=config.deployment,
            join_token=config.join_token,
            evidence=evidence,
            claims=claims,
            csr=certificate_request(identity.key),
        )
        tpm = identity.attester if isinstance(identity.attester, TpmAttester) else None
        if tpm is not None:
            request.tpm_ek_public = tpm.ek_public
            request.tpm_ek_certificate = tpm.ek_certificate or b""
        try:
            reply = await stub.Enrol(request, timeout=config.call_timeout)
            if reply.HasField("credential"):
                if tpm is None:
                    raise ProtocolError("custodian sent a TPM credential to an enclave without a TPM")
                secret = await asyncio.to_thread(_activate, tpm, reply.credential)
                activation = custos_pb2.ActivateCredentialRequest(
                    challenge_id=reply.credential.challenge_id, secret=secret
                )
                reply = await stub.ActivateCredential(activation, timeout=config.call_timeout)
        except grpc.aio.AioRpcError as exc:
            raise _enrol_error(exc, address) from None
    enrolment = _check_enrolment(reply, identity, address)
    if reply.ak_certificate:
        if tpm is None:
            raise ProtocolError("custodian sent an AK certificate to an enclave without a TPM")
        try:
            tpm.use_ak_certificate(reply.ak_certificate)
        except (ValueError, EvidenceError) as exc:  # a malformed certificate raises EvidenceError
            raise ProtocolError(f"custodian issued an unusable AK certificate: {exc}") from None
    logger.info("enrolled as instance %s (gateway %s)", enrolment.instance_id, enrolment.gateway)
    return enrolment


def _activate(tpm: TpmAttester, credential: custos_pb2.CredentialChallenge) -> bytes:
    """The credential's secret; empty where the TPM refuses it, so the custodian records why."""
    try:
        return tpm.activate_credential(credential.credential_blob, credential.encrypted_secret)
    except TpmDeviceError as exc:
        logger.error("%s", exc)
        return b""


async def gateway_of(config: DaemonConfig, address: str) -> str:
    """Where the custodian replica at ``address`` (an enrolment listener) has its gateway: HOST:PORT.

    Asked with a challenge, which costs the custodian nothing and records nothing.
    """
    credentials = grpc.ssl_channel_credentials(root_certificates=config.custodian_ca_pem)
    async with grpc.aio.secure_channel(address, credentials, options=channel_options(config)) as channel:
        stub = custos_pb2_grpc.EnclaveGatewayStub(channel)
        request = custos_pb2.ChallengeRequest(deployment=config.deployment)
        challenge = await stub.GetChallenge(request, timeout=config.call_timeout)
    if not 0 < challenge.mtls_port <= 65535:
        raise ProtocolError(f"custodian at {address} named no gateway port (an older custodian?)")
    host, _ = parse_address(address, what="--custodian")
    return f"{host}:{challenge.mtls_port}"


def certificate_request(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ENCLAVE_TLS_NAME)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


async def _challenge(
    stub: custos_pb2_grpc.EnclaveGatewayAsyncStub, config: DaemonConfig, address: str, patience: float
) -> custos_pb2.Challenge:
    """GetChallenge, retried while the custodian is not reachable, for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    delay = config.reconnect_initial
    request = custos_pb2.ChallengeRequest(deployment=config.deployment)
    while True:
        try:
            return await stub.GetChallenge(request, timeout=config.call_timeout)
        except grpc.aio.AioRpcError as exc:
            error = _enrol_error(exc, address)
            if isinstance(error, CustodianUnreachableError):
                await check_custodian_certificate(
                    config, CUSTODIAN_TLS_NAME, address
                )  # a wrong CA: say so at once
            if isinstance(error, EnrolmentRefusedError) or time.monotonic() + delay >= deadline:
                raise error from None
            logger.info("custodian not reachable yet (%s), retrying in %.1f s", exc.code().name, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, config.reconnect_max)


def _enrol_error(exc: grpc.aio.AioRpcError, address: str) -> DaemonError:
    """The error to raise for a failed call; a busy custodian raises ``_CustodianBusyError`` here."""
    details = exc.details() or exc.code().name
    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise _CustodianBusyError(details)
    if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
        return DeploymentSuspendedError(f"custodian refused enrolment for now: {details}")
    if exc.code() in _REFUSALS:
        return EnrolmentRefusedError(f"custodian refused enrolment ({exc.code().name}): {details}")
    return CustodianUnreachableError(f"cannot reach the custodian at {address}: {details}")


def _check_enrolment(reply: custos_pb2.Enrolment, identity: MeasuredIdentity, address: str) -> Enrolment:
    instance_id = reply.instance_id
    if not 0 < len(instance_id) <= _MAX_INSTANCE_ID or not set(instance_id) <= _INSTANCE_ID_CHARS:
        raise ProtocolError("custodian issued an unusable instance id")
    try:
        certificate = x509.load_pem_x509_certificate(reply.certificate)
    except ValueError:
        raise ProtocolError("custodian issued a certificate that does not parse") from None
    if public_key_der(_ec_key(certificate)) != identity.public_key_der:
        raise ProtocolError("custodian issued a certificate for another key")
    if not 0 < reply.mtls_port <= 65535:
        raise ProtocolError(f"custodian named gateway port {reply.mtls_port}")
    host, _ = parse_address(address, what="--custodian")
    return Enrolment(
        instance_id=instance_id,
        certificate_pem=reply.certificate,
        offline_grace=reply.offline_grace_seconds,
        lease_size=reply.lease_size,
        gateway=f"{host}:{reply.mtls_port}",
        custodian=address,
        zeroize_after=reply.zeroize_after_seconds or ZEROIZE_GRACES * reply.offline_grace_seconds,
    )


def _ec_key(certificate: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProtocolError("custodian issued a certificate for a non-EC key")
    return key
