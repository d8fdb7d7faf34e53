"""A simulated enclave instance for load: genuine sim-platform enrolment, then gateway calls over mutual TLS.

It does what ``enclave serve`` does up to serving, with the public enclave
modules only: an identity key, the ``sim`` attester extended with the real
measurement log (this build's code, the custodian CA it pins), claims over the
custodian's nonce, evidence over the claims, a CSR for the same key. The
custodian appraises it exactly as it appraises a real enclave. After that the
instance holds a mutual-TLS channel to the gateway and signs a usage receipt
(``enclave.receipts``) for every report, as the daemon does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave.attestation import AttestedClaims, MeasurementEvent
from enclave.attestation.measurement import config_event
from enclave.attestation.sim import SimAttester
from enclave.identity import ENCLAVE_TLS_NAME, generate_identity_key, private_key_pem, public_key_der
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc

CUSTODIAN_TLS_NAME = "custodian.custos"
# Separate connections per instance, as separate enclave processes would have.
CHANNEL_OPTIONS: list[tuple[str, str | int]] = [("grpc.use_local_subchannel_pool", 1)]


def ca_der(ca_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)


def certificate_request(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ENCLAVE_TLS_NAME)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def stale_code(error: BaseException) -> bool:
    """Whether the custodian refused an enrolment because the code measurement is not the manifest's:
    the sources changed between writing the manifest and measuring them (an edited checkout)."""
    return "code measurement" in str(error)


@dataclass
class SimInstance:
    custodian_ca_pem: bytes
    deployment: str
    # This build's code measurement (``enclave.attestation.measurement.code_event()``), taken when
    # the deployment's manifest was written.
    code: MeasurementEvent
    key: ec.EllipticCurvePrivateKey = field(default_factory=generate_identity_key)
    attester: SimAttester = field(default_factory=SimAttester)
    instance_id: str = ""
    certificate_pem: bytes = b""
    mtls_port: int = 0

    def __post_init__(self) -> None:
        self.log = (self.code, config_event(ca_der(self.custodian_ca_pem)))
        for event in self.log:
            self.attester.extend(event.digests())

    @property
    def public_key(self) -> bytes:
        return public_key_der(self.key)

    def enrol_request(self, nonce: bytes, token: str) -> pb.EnrolRequest:
        """What the daemon sends: claims for the nonce, evidence over them, a CSR, the join token."""
        claims = AttestedClaims(
            nonce=nonce,
            public_key=self.public_key,
            deployment=self.deployment,
            platform=self.attester.platform,
            purpose="enrol",
            log=self.log,
        )
        evidence = self.attester.collect(claims.report_data())
        return pb.EnrolRequest(
            deployment=self.deployment,
            join_token=token,
            evidence=evidence.to_bytes(),
            claims=claims.to_bytes(),
            csr=certificate_request(self.key),
        )

    def enrolment_channel(self, address: str) -> grpc.Channel:
        return grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=self.custodian_ca_pem),
            options=[("grpc.ssl_target_name_override", CUSTODIAN_TLS_NAME), *CHANNEL_OPTIONS],
        )

    def enrol(self, address: str, token: str) -> None:
        """GetChallenge and Enrol on a fresh TLS channel, as the daemon does at start."""
        with self.enrolment_channel(address) as channel:
            stub = pb_grpc.EnclaveGatewayStub(channel)
            challenge: pb.Challenge = stub.GetChallenge(pb.ChallengeRequest(deployment=self.deployment))
            enrolled: pb.Enrolment = stub.Enrol(self.enrol_request(challenge.nonce, token), timeout=30)
        self.instance_id = enrolled.instance_id
        self.certificate_pem = enrolled.certificate
        self.mtls_port = enrolled.mtls_port

    def gateway_channel(self, host: str) -> grpc.aio.Channel:
        """The mutual-TLS channel to the gateway, with the certificate issued at enrolment."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.custodian_ca_pem,
            private_key=private_key_pem(self.key),
            certificate_chain=self.certificate_pem,
        )
        return grpc.aio.secure_channel(
            f"{host}:{self.mtls_port}",
            credentials,
            options=[("grpc.ssl_target_name_override", CUSTODIAN_TLS_NAME), *CHANNEL_OPTIONS],
        )
