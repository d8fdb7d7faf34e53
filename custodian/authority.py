"""The custodian's certificate authorities and the certificates they issue.

- The **TLS CA** issues the custodian's own server certificate (SAN
  ``custodian.custos``). Enclaves pin it; its fingerprint is measured into the
  enclave's configuration and named in every manifest.
- The **enclave CA** issues each enrolled instance a short-lived client
  certificate (CN = instance id) for the attested key, which the gateway
  requires for mutual TLS.
- The **AK CA** certifies a TPM's attestation key once credential activation
  proved it lives in the TPM of a trusted EK (EKU tcg-kp-AIKCertificate only).
  End users trust TPM quotes through it (``[tpm] ak_roots``). It is a CA of its
  own because the enclave CA certifies software keys: any enrolled instance
  holds one, and none of them may pass as a TPM's AK.

The CA keys live in the data directory (0600). Server keys are made fresh in
memory at every start.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from custodian.data_dir import read_private, write_private
from custodian.errors import ConfigError, InvalidRequestError, RefusedError
from enclave.attestation.tpm_ak import TCG_KP_AIK_CERTIFICATE
from enclave.identity import private_key_pem, public_key_der

logger = logging.getLogger(__name__)

CUSTODIAN_TLS_NAME = "custodian.custos"
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=365)
MAX_CSR_BYTES = 16 * 1024
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class ServerIdentity:
    """A server key and certificate chain, PEM, as gRPC server credentials take them."""

    key_pem: bytes
    chain_pem: bytes


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self._key = key
        self.certificate = certificate

    @classmethod
    def load_or_create(
        cls, directory: Path, stem: str, common_name: str, *, now: datetime.datetime
    ) -> CertificateAuthority:
        """The CA kept as ``STEM.key`` and ``STEM.pem`` in ``directory``, created on first use."""
        key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
        if key_path.exists() or cert_path.exists():
            try:
                key_pem, cert_pem = read_private(key_path), cert_path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot load the {stem} in {directory}: {exc}") from exc
            return cls.from_pem(key_pem, cert_pem, f"the {stem} in {directory}")
        ca = cls.create(common_name, now=now)
        write_private(key_path, ca.key_pem)
        write_private(cert_path, ca.pem)
        logger.info("created %s (%s)", cert_path, common_name)
        return ca

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes, what: str) -> CertificateAuthority:
        """A CA from its key and certificate (PEM); ``what`` names them in an error."""
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise ConfigError(f"cannot load {what}: {exc}") from exc
        public = certificate.public_key()
        if (
            not isinstance(key, ec.EllipticCurvePrivateKey)
            or not isinstance(public, ec.EllipticCurvePublicKey)
            or public_key_der(key) != public_key_der(public)
        ):
            raise ConfigError(f"the key of {what} does not match its certificate")
        return cls(key, certificate)

    @classmethod
    def create(cls, common_name: str, *, now: datetime.datetime) -> CertificateAuthority:
        """A new CA: a fresh P-256 key and a self-signed certificate, in memory."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def key_pem(self) -> bytes:
        """The CA's private key, PEM: only to be written 0600 or wrapped."""
        return private_key_pem(self._key)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def sha256(self) -> str:
        """SHA-256 of the CA certificate's DER: what enclaves measure and manifests pin."""
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    def server_identity(self, dns_name: str, *, now: datetime.datetime) -> ServerIdentity:
        """A fresh in-memory server key with a certificate for ``dns_name``."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self._issue(
            key.public_key(),
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]),
            ExtendedKeyUsageOID.SERVER_AUTH,
            now=now,
            validity=SERVER_VALIDITY,
            san=dns_name,
        )
        return ServerIdentity(
            private_key_pem(key), certificate.public_bytes(serialization.Encoding.PEM) + self.pem
        )

    def issue_client(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        *,
        now: datetime.datetime,
        validity: datetime.timedelta,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        return self._issue(public_key, name, ExtendedKeyUsageOID.CLIENT_AUTH, now=now, validity=validity)

    def issue_ak(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        instance_id: str,
        *,
        now: datetime.datetime,
        validity: datetime.timedelta,
    ) -> x509.Certificate:
        """A certificate for a TPM attestation key whose residency a credential activation proved.

        Call it on the AK CA only. It certifies exactly ``public_key``, the key of the AK whose
        ``TPMT_PUBLIC`` (attributes checked) was activated; its extended key usage is
        tcg-kp-AIKCertificate only: it is no client certificate.
        """
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{instance_id} TPM AK")])
        return self._issue(public_key, name, TCG_KP_AIK_CERTIFICATE, now=now, validity=validity)

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        *,
        now: datetime.datetime,
        validity: datetime.timedelta,
        san: str | None = None,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(min(now + validity, self.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(self._key, hashes.SHA256())


def csr_public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a PKCS#10 request, check its self-signature, and return its key, which must be P-256."""
    if len(der) > MAX_CSR_BYTES:
        raise InvalidRequestError(f"CSR is {len(der)} bytes, over the {MAX_CSR_BYTES}-byte limit")
    try:
        csr = x509.load_der_x509_csr(der)
        public = csr.public_key()
    except ValueError as exc:
        raise InvalidRequestError(f"CSR does not parse: {exc}") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise InvalidRequestError("CSR key is not a P-256 key")
    if not csr.is_signature_valid:
        raise RefusedError("CSR signature does not verify")
    return public


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
