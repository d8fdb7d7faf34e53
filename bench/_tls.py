"""TLS material for the baseline servers: a self-signed server certificate and a client CA.

The baselines speak TLS the way the Custos servers do (P-256 keys, ECDSA-SHA256
certificates, a fixed name the client overrides to, a pinned certificate), so
the handshake and record costs match and only the Custos logic differs.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVER_NAME = "baseline.bench"
_VALIDITY = datetime.timedelta(days=2)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = False,
    san: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signer = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class TlsFiles:
    """Where the baseline server's key material lies, and the client side's."""

    server_key: Path
    server_cert: Path  # self-signed; clients pin it, as Custos clients pin the enclave's
    client_ca: Path
    client_key: Path
    client_cert: Path

    def read(self, name: str) -> bytes:
        path: Path = getattr(self, name)
        return path.read_bytes()


def make_tls(directory: Path) -> TlsFiles:
    """A fresh self-signed server certificate, a client CA and one client certificate it issued."""
    directory.mkdir(parents=True, exist_ok=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(SERVER_NAME, server_key, san=SERVER_NAME)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Bench client CA", ca_key, ca=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("bench-client", client_key, issuer=("Bench client CA", ca_key))
    files = TlsFiles(
        server_key=directory / "server.key",
        server_cert=directory / "server.pem",
        client_ca=directory / "client-ca.pem",
        client_key=directory / "client.key",
        client_cert=directory / "client.pem",
    )
    files.server_key.write_bytes(_key_pem(server_key))
    files.server_cert.write_bytes(_pem(server))
    files.client_ca.write_bytes(_pem(ca))
    files.client_key.write_bytes(_key_pem(client_key))
    files.client_cert.write_bytes(_pem(client))
    for path in (files.server_key, files.client_key):
        path.chmod(0o600)
    return files
