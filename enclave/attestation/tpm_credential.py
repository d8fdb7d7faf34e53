"""Trusting a TPM's attestation key through its endorsement key: credential activation, EK certificates.

A quote proves only that *some* restricted signing key signed it. The relying
party ties that attestation key (AK) to a genuine TPM in two steps:

1. :func:`verify_ek_certificate`: the TPM manufacturer (or the cloud's vTPM
   CA) certifies the endorsement key (EK) public key, chaining to a root the
   caller trusts.
2. :func:`make_credential`: ``TPM2_MakeCredential`` done in software. It
   encrypts a secret to the EK so that only a TPM holding that EK *and* an
   object with the given Name (the AK) can recover it with
   ``TPM2_ActivateCredential``. An enclave that answers with the secret has
   the AK in the same TPM as the certified EK.

MakeCredential follows the TPM 2.0 Library, Part 1 ("Credential Protection",
"Secret Sharing", "KDFa"/"KDFe") and Part 3 (``TPM2_MakeCredential``):

* ``seed``: as many random bytes as the EK's nameAlg digest. For an RSA EK it
  is RSA-OAEP encrypted (hash and MGF1 = nameAlg, label ``"IDENTITY\\0"``);
  for an ECC EK it is ``KDFe(nameAlg, Z, "IDENTITY", ephemeral.x, EK.x)`` with
  Z the ECDH x-coordinate of a fresh ephemeral key, sent as a ``TPMS_ECC_POINT``.
  Either way the result is the ``TPM2B_ENCRYPTED_SECRET``.
* ``symKey = KDFa(nameAlg, seed, "STORAGE", Name(AK), "", EK symmetric key bits)``;
  ``encIdentity = AES-CFB(symKey, IV = 0, TPM2B_DIGEST(secret))``.
* ``HMACkey = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)``;
  ``outerHMAC = HMAC_nameAlg(HMACkey, encIdentity || Name(AK))``.
* ``TPM2B_ID_OBJECT = size || TPM2B_DIGEST(outerHMAC) || encIdentity``.

Pure: no TPM and no I/O. EK and AK public areas are parsed with
:mod:`enclave.attestation.tpm_structures`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # newer cryptography moved CFB to its "decrepit" modes (and warns on the old import); TPMs use it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from enclave.attestation import tpm_chain
from enclave.attestation.certificates import check_validity
from enclave.attestation.tpm_structures import (
    HASH_NAMES,
    TPMA_OBJECT_DECRYPT,
    TPMA_OBJECT_RESTRICTED,
    TPMA_OBJECT_SIGN,
    TpmPublic,
    alg_name,
    parse_public,
)
from enclave.errors import EvidenceError

EkPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

TPM_ALG_AES = 0x0006
TPM_ALG_CFB = 0x0043

# tcg-kp-EKCertificate (TCG EK Credential Profile, section 3.2.16).
EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")

MAX_EK_CERTIFICATE_BYTES = 8 * 1024
MAX_EK_CHAIN_DEPTH = 4

_IDENTITY = b"IDENTITY\0"
_STORAGE = b"STORAGE\0"
_INTEGRITY = b"INTEGRITY\0"
_NAME_HASHES = ("sha256", "sha384", "sha512")
_AES_KEY_BITS = (128, 192, 256)


@dataclass(frozen=True)
class EkParameters:
    """What MakeCredential needs from an EK: its key, nameAlg and the AES key size of its template."""

    key: EkPublicKey
    name_hash: str
    aes_key_bits: int

    @property
    def digest_size(self) -> int:
        return hashlib.new(self.name_hash).digest_size


def ek_parameters(ek_public: bytes | EkPublicKey) -> EkParameters:
    """The EK's MakeCredential parameters from its ``TPMT_PUBLIC`` (or ``TPM2B_PUBLIC``), or from a bare key.

    A bare key is taken to have the TCG default low-range template (EK
    Credential Profile templates L-1 and L-2: nameAlg SHA-256, AES-128-CFB),
    so it must be RSA-2048 or ECC P-256. Raises ``EvidenceError``.
    """
    if isinstance(ek_public, rsa.RSAPublicKey):
        if ek_public.key_size != 2048:
            raise EvidenceError(
                "an EK given as a bare key must be RSA-2048 (TCG template L-1), "
                f"not RSA-{ek_public.key_size}; pass its TPMT_PUBLIC instead"
            )
        return EkParameters(key=ek_public, name_hash="sha256", aes_key_bits=128)
    if isinstance(ek_public, ec.EllipticCurvePublicKey):
        if not isinstance(ek_public.curve, ec.SECP256R1):
            raise EvidenceError(
                f"an EK given as a bare key must be P-256 (TCG template L-2), not {ek_public.curve.name}; "
                "pass its TPMT_PUBLIC instead"
            )
        return EkParameters(key=ek_public, name_hash="sha256", aes_key_bits=128)
    public = parse_public(ek_public)
    return _parameters_from_public(public)


def _parameters_from_public(public: TpmPublic) -> EkParameters:
    if not public.has(TPMA_OBJECT_RESTRICTED) or not public.has(TPMA_OBJECT_DECRYPT):
        raise EvidenceError(
            f"EK objectAttributes {public.object_attributes:#010x} are not those of a "
            "restricted decryption key"
        )
    if public.has(TPMA_OBJECT_SIGN):
        raise EvidenceError("EK is a signing key; an endorsement key is a restricted decryption key")
    name_hash = HASH_NAMES.get(public.name_alg)
    if name_hash not in _NAME_HASHES:
        raise EvidenceError(f"EK nameAlg {alg_name(public.name_alg)} is not SHA-256, SHA-384 or SHA-512")
    algorithm, key_bits, mode = _symmetric(public)
    if algorithm != TPM_ALG_AES or mode != TPM_ALG_CFB or key_bits not in _AES_KEY_BITS:
        raise EvidenceError(
            f"EK symmetric definition {alg_name(algorithm)}/{key_bits}/{alg_name(mode)} is not AES-CFB"
        )
    key = public.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise EvidenceError(f"EK is RSA-{key.key_size}, shorter than 2048 bits")
    return EkParameters(key=key, name_hash=name_hash, aes_key_bits=key_bits)


def _symmetric(public: TpmPublic) -> tuple[int, int, int]:
    """The ``TPMT_SYM_DEF_OBJECT`` of a parent key: algorithm, key bits, mode.

    ``parse_public`` checks and skips it; it sits right after authPolicy
    (type u16, nameAlg u16, objectAttributes u32, authPolicy TPM2B).
    """
    offset = 2 + 2 + 4 + 2 + len(public.auth_policy)
    raw = public.raw
    algorithm = int.from_bytes(raw[offset : offset + 2], "big")
    if algorithm != TPM_ALG_AES:
        return algorithm, 0, 0
    key_bits = int.from_bytes(raw[offset + 2 : offset + 4], "big")
    mode = int.from_bytes(raw[offset + 4 : offset + 6], "big")
    return algorithm, key_bits, mode


def object_name(public: bytes) -> bytes:
    """The TPM Name of an object from its ``TPMT_PUBLIC``: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
    return parse_public(public).name


def make_credential(ek_public: bytes | EkPublicKey, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """``TPM2_MakeCredential`` in software: protect ``secret`` for the TPM holding this EK and AK.

    ``ek_public`` is the EK's ``TPMT_PUBLIC`` (or a bare RSA-2048 / P-256 key,
    see :func:`ek_parameters`), ``ak_name`` the AK's Name (nameAlg u16 ||
    digest), ``secret`` 1 to nameAlg-digest-size bytes. Returns
    ``(credential_blob, encrypted_secret)``, marshalled ``TPM2B_ID_OBJECT`` and
    ``TPM2B_ENCRYPTED_SECRET`` (each with its u16 size), the two parameters of
    ``TPM2_ActivateCredential``.
    """
    ek = ek_parameters(ek_public)
    _check_name(ak_name)
    _check_secret(secret, ek)
    seed, encrypted_secret = _seed(ek)
    return _credential_blob(ek, ak_name, secret, seed), encrypted_secret


def _check_name(name: bytes) -> None:
    """A Name made with SHA-256 or stronger: nameAlg u16 || a digest of that algorithm."""
    name_alg = int.from_bytes(name[:2], "big") if len(name) >= 2 else None
    name_hash = HASH_NAMES.get(name_alg) if name_alg is not None else None
    if name_alg is None or name_hash not in _NAME_HASHES:
        raise EvidenceError(
            f"AK Name {name[:2].hex()}... does not start with a SHA-256, SHA-384 or SHA-512 nameAlg"
        )
    expected = 2 + hashlib.new(name_hash).digest_size
    if len(name) != expected:
        raise EvidenceError(f"AK Name is {len(name)} bytes, a {name_hash} Name has {expected}")


def _check_secret(secret: bytes, ek: EkParameters) -> None:
    if not 1 <= len(secret) <= ek.digest_size:
        raise ValueError(
            f"a credential secret is 1 to {ek.digest_size} bytes for an EK with nameAlg {ek.name_hash}, "
            f"got {len(secret)}"
        )


def _seed(ek: EkParameters) -> tuple[bytes, bytes]:
    """A fresh seed and its ``TPM2B_ENCRYPTED_SECRET`` for the EK."""
    algorithm = _hash(ek.name_hash)
    if isinstance(ek.key, rsa.RSAPublicKey):
        seed = os.urandom(ek.digest_size)
        encrypted = ek.key.encrypt(
            seed, padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=_IDENTITY)
        )
        return seed, _tpm2b(encrypted)
    ephemeral = ec.generate_private_key(ek.key.curve)
    return _ecc_seed(ek.key, ek.name_hash, ephemeral)


def _ecc_seed(
    key: ec.EllipticCurvePublicKey, name_hash: str, ephemeral: ec.EllipticCurvePrivateKey
) -> tuple[bytes, bytes]:
    """Seed = KDFe(nameAlg, Z, "IDENTITY", ephemeral.x, EK.x) and the ephemeral point as a TPMS_ECC_POINT."""
    size = (key.curve.key_size + 7) // 8
    z = ephemeral.exchange(ec.ECDH(), key)
    point = ephemeral.public_key().public_numbers()
    ephemeral_x, ephemeral_y = point.x.to_bytes(size, "big"), point.y.to_bytes(size, "big")
    ek_x = key.public_numbers().x.to_bytes(size, "big")
    seed = _kdfe(name_hash, z, _IDENTITY, ephemeral_x, ek_x, 8 * hashlib.new(name_hash).digest_size)
    return seed, _tpm2b(_tpm2b(ephemeral_x) + _tpm2b(ephemeral_y))


def _credential_blob(ek: EkParameters, name: bytes, secret: bytes, seed: bytes) -> bytes:
    """The ``TPM2B_ID_OBJECT`` protecting ``secret`` under ``seed`` for the object ``name``."""
    sym_key = _kdfa(ek.name_hash, seed, _STORAGE, name, b"", ek.aes_key_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_tpm2b(secret)) + encryptor.finalize()
    hmac_key = _kdfa(ek.name_hash, seed, _INTEGRITY, b"", b"", 8 * ek.digest_size)
    outer_hmac = hmac.new(hmac_key, enc_identity + name, ek.name_hash).digest()
    return _tpm2b(_tpm2b(outer_hmac) + enc_identity)


def _kdfa(hash_name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa (Part 1, 11.4.10.2): SP 800-108 counter mode with HMAC; ``label`` includes its NUL."""
    out = b""
    counter = 0
    while 8 * len(out) < bits:
        counter += 1
        block = counter.to_bytes(4, "big") + label + context_u + context_v + bits.to_bytes(4, "big")
        out += hmac.new(key, block, hash_name).digest()
    return _leftmost(out, bits)


def _kdfe(hash_name: str, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe (Part 1, 11.4.10.3): the SP 800-56A concatenation KDF; ``label`` includes its NUL."""
    out = b""
    counter = 0
    while 8 * len(out) < bits:
        counter += 1
        out += hashlib.new(hash_name, counter.to_bytes(4, "big") + z + label + party_u + party_v).digest()
    return _leftmost(out, bits)


def _leftmost(data: bytes, bits: int) -> bytes:
    size = (bits + 7) // 8
    out = bytearray(data[:size])
    if bits % 8:
        out[0] &= 0xFF >> (8 - bits % 8)
    return bytes(out)


def _tpm2b(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _hash(name: str) -> hashes.HashAlgorithm:
    return {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[name]


# --- EK certificates ---


def load_ek_certificate(data: bytes) -> x509.Certificate:
    """An EK certificate as read from its NV index (DER, possibly zero-padded) or PEM."""
    if len(data) > MAX_EK_CERTIFICATE_BYTES:
        raise EvidenceError(
            f"EK certificate is {len(data)} bytes, over the {MAX_EK_CERTIFICATE_BYTES}-byte limit"
        )
    raw = bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(_trim_der(raw))
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
        raise EvidenceError(f"EK certificate does not parse as X.509: {exc}") from None


def _trim_der(raw: bytes) -> bytes:
    """The DER SEQUENCE at the start of ``raw``: NV indices are often larger than the certificate."""
    if len(raw) >= 4 and raw[0] == 0x30 and raw[1] == 0x82:
        return raw[: 4 + int.from_bytes(raw[2:4], "big")]
    if len(raw) >= 3 and raw[0] == 0x30 and raw[1] == 0x81:
        return raw[: 3 + raw[2]]
    return raw


def verify_ek_certificate(
    ek_cert: bytes | x509.Certificate,
    ek_public: bytes | EkPublicKey,
    *,
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    now: datetime,
) -> list[x509.Certificate]:
    """Check that ``ek_cert`` certifies ``ek_public`` and chains to one of ``roots`` at ``now``.

    ``ek_public`` is the EK's ``TPMT_PUBLIC`` or key. The leaf must carry
    exactly that key, must not be a CA, and where it has an extendedKeyUsage
    it must include tcg-kp-EKCertificate; every certificate up to the root
    must be valid at ``now``, and each intermediate a CA within its path
    length. Revocation is not checked (no I/O). Returns the chain, leaf
    first, ending with the root; raises ``EvidenceError``.
    """
    if not roots:
        raise EvidenceError("no EK certificate roots are configured")
    certificate = ek_cert if isinstance(ek_cert, x509.Certificate) else load_ek_certificate(ek_cert)
    expected = (
        ek_public if not isinstance(ek_public, bytes | bytearray) else parse_public(ek_public).public_key()
    )
    when = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    try:
        certified = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EvidenceError(f"EK certificate public key does not parse: {exc}") from None
    if _spki(certified) != _spki(expected):
        raise EvidenceError("EK certificate is for another key than this EK")
    constraints = tpm_chain.extension(certificate, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise EvidenceError("EK certificate is a CA certificate")
    usage = tpm_chain.extension(certificate, x509.ExtendedKeyUsage)
    if usage is not None and EK_CERTIFICATE_EKU not in usage:
        raise EvidenceError("EK certificate's extendedKeyUsage does not include tcg-kp-EKCertificate")
    check_validity(certificate, when, "EK certificate")
    return tpm_chain.walk_chain(
        certificate,
        roots=roots,
        intermediates=intermediates,
        when=when,
        role="EK",
        max_depth=MAX_EK_CHAIN_DEPTH,
    )


def _spki(key: object) -> bytes:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise EvidenceError(f"EK certificate key is a {type(key).__name__}, not an RSA or EC key")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
