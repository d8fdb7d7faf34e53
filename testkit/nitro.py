"""A synthetic AWS Nitro PKI and attestation documents signed by it, for tests.

The chain has the shape of AWS's: a self-signed P-384 root, a regional, a
zonal and an instance CA (path lengths 2, 1, 0), and a leaf that lives three
hours and signs the COSE_Sign1 document with ES384. Only a test that installs
this root as the trust anchor (:func:`trusting_root`, or the ``sitecustomize``
of :func:`site_directory` in a child process) accepts what it signs; the
shipped tools keep the AWS Nitro Root-G1 pinned.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

import enclave.attestation.nitro

# PCRs of the documents the doubles sign, for manifests (hex, by register name).
ENCLAVE_PCRS = {0: "a0" * 48, 1: "a1" * 48, 2: "a2" * 48, 3: "00" * 48, 4: "a4" * 48, 8: "00" * 48}
TPM_PCRS = {i: f"{0xB0 + i:02x}" * 48 for i in range(24)}


def registers(pcrs: Mapping[int, str], pinned: tuple[int, ...]) -> dict[str, str]:
    """``{"pcr0": HEX, ...}`` for the ``pinned`` indices."""
    return {f"pcr{i}": pcrs[i] for i in pinned}


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Custos tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    not_before: datetime,
    lifetime: timedelta,
    path_length: int | None,
    ca: bool = True,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .sign(issuer_key, hashes.SHA384())
    )


@dataclass
class NitroPki:
    """Root, three CAs and a leaf, all P-384 and valid from ``start`` (the leaf for three hours)."""

    start: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(minutes=5))
    keys: list[ec.EllipticCurvePrivateKey] = field(init=False)
    chain: list[x509.Certificate] = field(init=False)  # root first, leaf last

    def __post_init__(self) -> None:
        self.keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(5)]
        names = ["synthetic.nitro-enclaves", "region.synthetic", "zonal.synthetic", "instance.synthetic"]
        lifetimes = [timedelta(days=3650), timedelta(days=20), timedelta(days=6), timedelta(days=1)]
        self.chain = []
        for i, (common_name, lifetime) in enumerate(zip(names, lifetimes, strict=True)):
            issuer = None if i == 0 else (self.chain[-1].subject, self.keys[i - 1])
            path_length = None if i == 0 else 3 - i
            self.chain.append(
                _certificate(
                    common_name,
                    self.keys[i],
                    issuer,
                    not_before=self.start,
                    lifetime=lifetime,
                    path_length=path_length,
                )
            )
        self.chain.append(
            _certificate(
                "i-0123456789abcdef0-enc0123456789abcdef.synthetic",
                self.keys[4],
                (self.chain[-1].subject, self.keys[3]),
                not_before=self.start,
                lifetime=timedelta(hours=3),
                path_length=None,
                ca=False,
            )
        )

    @property
    def root_der(self) -> bytes:
        return self.chain[0].public_bytes(serialization.Encoding.DER)

    @property
    def root_sha256(self) -> str:
        return hashlib.sha256(self.root_der).hexdigest()

    def to_pem(self) -> bytes:
        """The chain and the leaf's key, for a child process's double."""
        key = self.keys[4].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def signer(self) -> SignedBy:
        return SignedBy(key=self.keys[4], chain=list(self.chain))


@dataclass(frozen=True)
class SignedBy:
    """The leaf key and the chain (root first, leaf last) a document is signed with."""

    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]


def load_signer(data: bytes) -> SignedBy:
    """What :meth:`NitroPki.to_pem` wrote."""
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return SignedBy(key=key, chain=x509.load_pem_x509_certificates(data))


def payload(
    signer: SignedBy,
    *,
    tpm: bool = False,
    pcrs: Mapping[int, str] | None = None,
    nonce: bytes | None = None,
    user_data: bytes | None = None,
    public_key: bytes | None = None,
    timestamp: datetime | None = None,
) -> dict[str, Any]:
    """The payload map of a document, in AWS's field order."""
    when = timestamp or datetime.now(UTC)
    values = pcrs if pcrs is not None else (TPM_PCRS if tpm else ENCLAVE_PCRS)
    der = [c.public_bytes(serialization.Encoding.DER) for c in signer.chain]
    return {
        "module_id": "i-0123456789abcdef0" + ("" if tpm else "-enc0123456789abcdef"),
        "digest": "SHA384",
        "timestamp": int(when.timestamp() * 1000),
        ("nitrotpm_pcrs" if tpm else "pcrs"): {i: bytes.fromhex(v) for i, v in values.items()},
        "certificate": der[-1],
        "cabundle": der[:-1],
        "public_key": public_key,
        "user_data": user_data,
        "nonce": nonce,
    }


def sign(signer: SignedBy, fields: Mapping[str, Any], *, protected: bytes | None = None) -> bytes:
    """A COSE_Sign1 document (untagged, as AWS makes them) over ``fields``."""
    header = protected if protected is not None else cbor2.dumps({1: -35})
    body = cbor2.dumps(dict(fields))
    to_sign = cbor2.dumps(["Signature1", header, b"", body])
    r, s = decode_dss_signature(signer.key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    return bytes(cbor2.dumps([header, {}, body, r.to_bytes(48, "big") + s.to_bytes(48, "big")]))


def document(signer: SignedBy, **kwargs: Any) -> bytes:
    return sign(signer, payload(signer, **kwargs))


@contextlib.contextmanager
def trusting_root(root_sha256: str) -> Iterator[None]:
    """Make this process trust ``root_sha256`` as a Nitro root, besides AWS's, for a while (tests only)."""
    pinned = enclave.attestation.nitro.TRUSTED_ROOTS_SHA256
    enclave.attestation.nitro.TRUSTED_ROOTS_SHA256 = pinned | {root_sha256}
    try:
        yield
    finally:
        enclave.attestation.nitro.TRUSTED_ROOTS_SHA256 = pinned


_SITECUSTOMIZE = '''\
"""Written by testkit.nitro for one test's child processes: trust its synthetic Nitro root too."""

from pathlib import Path

import enclave.attestation.nitro as nitro

_synthetic = Path(__file__).with_name("nitro-root.sha256").read_text().strip()
nitro.TRUSTED_ROOTS_SHA256 = nitro.TRUSTED_ROOTS_SHA256 | {_synthetic}
'''


def site_directory(directory: Path, root_sha256: str) -> Path:
    """A directory for a child's ``PYTHONPATH`` that makes it trust ``root_sha256`` as a Nitro root."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nitro-root.sha256").write_text(root_sha256)
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return directory
