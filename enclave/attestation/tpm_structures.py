"""TPM 2.0 structures a quote verifier reads: ``TPMS_ATTEST``, ``TPMT_SIGNATURE``, ``TPMT_PUBLIC``.

Unmarshalling only (no signature checks; :mod:`enclave.attestation.tpm` does
those). Layouts follow the TCG "TPM 2.0 Library, Part 2: Structures"; every
integer is big-endian and every ``TPM2B_*`` is a u16 size followed by that
many bytes, bounded by the structure's maximum size before it is read.

* ``TPMS_ATTEST`` (a quote): magic u32 (``TPM_GENERATED_VALUE``), type u16
  (``TPM_ST_ATTEST_QUOTE``), qualifiedSigner ``TPM2B_NAME``, extraData
  ``TPM2B_DATA`` (the caller's qualifying data), clockInfo (clock u64,
  resetCount u32, restartCount u32, safe u8), firmwareVersion u64, then
  ``TPMS_QUOTE_INFO``: ``TPML_PCR_SELECTION`` (count u32; per bank: hash u16,
  sizeofSelect u8, a PCR bitmap) and pcrDigest ``TPM2B_DIGEST``.
* ``TPMT_SIGNATURE``: sigAlg u16, hashAlg u16, then ``TPM2B`` signature
  (RSASSA, RSAPSS) or ``TPM2B`` r and ``TPM2B`` s (ECDSA).
* ``TPMT_PUBLIC``: type u16, nameAlg u16, objectAttributes u32, authPolicy
  ``TPM2B``, the RSA or ECC parameters, then the public key (``unique``).

Only the quote attestation type and RSA/ECC keys are understood; anything else
is refused. Every malformed input raises ``EvidenceError`` naming the field,
and trailing bytes are an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enclave.errors import EvidenceError

MAX_ATTEST_BYTES = 1024
MAX_SIGNATURE_BYTES = 1024
MAX_PUBLIC_BYTES = 1024

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018

TPM_ALG_RSA = 0x0001
TPM_ALG_SHA1 = 0x0004
TPM_ALG_HMAC = 0x0005
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D
TPM_ALG_NULL = 0x0010
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAES = 0x0015
TPM_ALG_RSAPSS = 0x0016
TPM_ALG_ECDSA = 0x0018
TPM_ALG_ECDAA = 0x001A
TPM_ALG_ECC = 0x0023

TPM_ECC_NIST_P256 = 0x0003
TPM_ECC_NIST_P384 = 0x0004

# TPMA_OBJECT bits that matter for an attestation key.
TPMA_OBJECT_FIXED_TPM = 1 << 1
TPMA_OBJECT_FIXED_PARENT = 1 << 4
TPMA_OBJECT_SENSITIVE_DATA_ORIGIN = 1 << 5
TPMA_OBJECT_RESTRICTED = 1 << 16
TPMA_OBJECT_DECRYPT = 1 << 17
TPMA_OBJECT_SIGN = 1 << 18

# The PCR banks (hash algorithms) this verifier can recompute, by TPM_ALG_ID.
HASH_NAMES: Mapping[int, str] = {
    TPM_ALG_SHA1: "sha1",
    TPM_ALG_SHA256: "sha256",
    TPM_ALG_SHA384: "sha384",
    TPM_ALG_SHA512: "sha512",
}
HASH_IDS: Mapping[str, int] = {name: alg for alg, name in HASH_NAMES.items()}
DIGEST_SIZES: Mapping[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
SIGNATURE_SCHEMES: Mapping[int, str] = {
    TPM_ALG_RSASSA: "rsassa",
    TPM_ALG_RSAPSS: "rsapss",
    TPM_ALG_ECDSA: "ecdsa",
}
ECC_CURVES: Mapping[int, tuple[str, int]] = {
    TPM_ECC_NIST_P256: ("P-256", 32),
    TPM_ECC_NIST_P384: ("P-384", 48),
}

# Maximum TPM2B sizes (TPM 2.0 Part 2 with SHA-512, RSA-4096 and P-521 support).
_MAX_NAME = 2 + 64  # TPMU_NAME: a TPMT_HA
_MAX_DATA = 2 + 64  # TPM2B_DATA: sizeof(TPMT_HA)
_MAX_DIGEST = 64
_MAX_RSA_BYTES = 512
_MAX_ECC_BYTES = 66
_MAX_BANKS = 16
_MAX_SELECT_BYTES = 8  # up to 64 PCRs per bank


def alg_name(alg: int) -> str:
    """A TPM_ALG_ID for messages: ``0x000b (sha256)``."""
    known = {**HASH_NAMES, **SIGNATURE_SCHEMES, TPM_ALG_RSA: "rsa", TPM_ALG_ECC: "ecc", TPM_ALG_NULL: "null"}
    name = known.get(alg)
    return f"{alg:#06x} ({name})" if name else f"{alg:#06x}"


class _Reader:
    """Reads big-endian fields; every overrun is an ``EvidenceError`` naming the field."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._what = what
        self.offset = 0

    def take(self, size: int, field: str) -> bytes:
        if size > len(self._data) - self.offset:
            raise EvidenceError(
                f"{self._what} is truncated in {field}: needs {size} bytes at offset {self.offset}, "
                f"{len(self._data) - self.offset} left"
            )
        chunk = self._data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def tpm2b(self, field: str, max_size: int) -> bytes:
        size = self.uint(2, f"{field} size")
        if size > max_size:
            raise EvidenceError(f"{self._what} {field} is {size} bytes, over its {max_size}-byte maximum")
        return self.take(size, field)

    def end(self) -> None:
        left = len(self._data) - self.offset
        if left:
            raise EvidenceError(f"{self._what} has {left} unexpected trailing bytes at offset {self.offset}")


def _bounded(data: bytes, limit: int, what: str) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EvidenceError(f"{what} must be bytes")
    if len(data) > limit:
        raise EvidenceError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")


@dataclass(frozen=True)
class ClockInfo:
    """``TPMS_CLOCK_INFO``: milliseconds the TPM has run, and its reset/restart counters."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class PcrSelection:
    """One bank of a ``TPML_PCR_SELECTION``: the hash algorithm and the selected PCRs, ascending."""

    hash_alg: int
    bank: str
    pcrs: tuple[int, ...]


@dataclass(frozen=True)
class Attest:
    """A parsed ``TPMS_ATTEST`` of type quote; ``raw`` is exactly the signed bytes."""

    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_selection: tuple[PcrSelection, ...]
    pcr_digest: bytes
    raw: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": f"{self.type:#06x}",
            "qualified_signer": self.qualified_signer.hex(),
            "extra_data": self.extra_data.hex(),
            "clock": self.clock_info.clock,
            "reset_count": self.clock_info.reset_count,
            "restart_count": self.clock_info.restart_count,
            "safe": self.clock_info.safe,
            "firmware_version": f"{self.firmware_version:#018x}",
            "pcr_selection": {sel.bank: list(sel.pcrs) for sel in self.pcr_selection},
            "pcr_digest": self.pcr_digest.hex(),
        }


def parse_attest(data: bytes) -> Attest:
    """Parse a quote's ``TPMS_ATTEST``; refuses other attestation types."""
    _bounded(data, MAX_ATTEST_BYTES, "TPMS_ATTEST")
    raw = bytes(data)
    r = _Reader(raw, "TPMS_ATTEST")
    magic = r.uint(4, "magic")
    if magic != TPM_GENERATED_VALUE:
        raise EvidenceError(f"TPMS_ATTEST magic is {magic:#010x}, expected {TPM_GENERATED_VALUE:#010x}")
    kind = r.uint(2, "type")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise EvidenceError(f"TPMS_ATTEST type is {kind:#06x}, not a quote ({TPM_ST_ATTEST_QUOTE:#06x})")
    qualified_signer = r.tpm2b("qualifiedSigner", _MAX_NAME)
    extra_data = r.tpm2b("extraData", _MAX_DATA)
    clock = r.uint(8, "clockInfo.clock")
    reset_count = r.uint(4, "clockInfo.resetCount")
    restart_count = r.uint(4, "clockInfo.restartCount")
    safe = r.uint(1, "clockInfo.safe")
    if safe > 1:
        raise EvidenceError(f"TPMS_ATTEST clockInfo.safe is {safe}, not a TPMI_YES_NO")
    firmware_version = r.uint(8, "firmwareVersion")
    selection = _pcr_selection(r)
    pcr_digest = r.tpm2b("pcrDigest", _MAX_DIGEST)
    r.end()
    return Attest(
        type=kind,
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock_info=ClockInfo(clock, reset_count, restart_count, bool(safe)),
        firmware_version=firmware_version,
        pcr_selection=selection,
        pcr_digest=pcr_digest,
        raw=raw,
    )


def _pcr_selection(r: _Reader) -> tuple[PcrSelection, ...]:
    count = r.uint(4, "pcrSelect.count")
    if count > _MAX_BANKS:
        raise EvidenceError(f"TPMS_ATTEST pcrSelect.count is {count}, over the maximum of {_MAX_BANKS}")
    banks: list[PcrSelection] = []
    for n in range(count):
        hash_alg = r.uint(2, f"pcrSelect[{n}].hash")
        size = r.uint(1, f"pcrSelect[{n}].sizeofSelect")
        if size > _MAX_SELECT_BYTES:
            raise EvidenceError(
                f"TPMS_ATTEST pcrSelect[{n}].sizeofSelect is {size}, over the maximum of {_MAX_SELECT_BYTES}"
            )
        bitmap = r.take(size, f"pcrSelect[{n}].pcrSelect")
        bank = HASH_NAMES.get(hash_alg)
        if bank is None:
            raise EvidenceError(
                f"TPMS_ATTEST pcrSelect[{n}] selects an unsupported bank {alg_name(hash_alg)}"
            )
        if any(sel.hash_alg == hash_alg for sel in banks):
            raise EvidenceError(f"TPMS_ATTEST pcrSelect selects the {bank} bank twice")
        pcrs = tuple(i for i in range(8 * size) if bitmap[i // 8] >> (i % 8) & 1)
        banks.append(PcrSelection(hash_alg=hash_alg, bank=bank, pcrs=pcrs))
    return tuple(banks)


@dataclass(frozen=True)
class TpmSignature:
    """A parsed ``TPMT_SIGNATURE``: RSA schemes fill ``signature``, ECDSA fills ``r`` and ``s``."""

    sig_alg: int
    hash_alg: int
    signature: bytes = b""
    r: bytes = b""
    s: bytes = b""

    @property
    def scheme(self) -> str:
        return SIGNATURE_SCHEMES.get(self.sig_alg, f"{self.sig_alg:#06x}")

    @property
    def hash_name(self) -> str | None:
        return HASH_NAMES.get(self.hash_alg)


def parse_signature(data: bytes) -> TpmSignature:
    """Parse a ``TPMT_SIGNATURE`` (RSASSA, RSAPSS or ECDSA)."""
    _bounded(data, MAX_SIGNATURE_BYTES, "TPMT_SIGNATURE")
    r = _Reader(bytes(data), "TPMT_SIGNATURE")
    sig_alg = r.uint(2, "sigAlg")
    if sig_alg not in SIGNATURE_SCHEMES:
        raise EvidenceError(f"TPMT_SIGNATURE sigAlg {alg_name(sig_alg)} is not RSASSA, RSAPSS or ECDSA")
    hash_alg = r.uint(2, "hash")
    if sig_alg == TPM_ALG_ECDSA:
        sig_r = r.tpm2b("signatureR", _MAX_ECC_BYTES)
        sig_s = r.tpm2b("signatureS", _MAX_ECC_BYTES)
        r.end()
        return TpmSignature(sig_alg=sig_alg, hash_alg=hash_alg, r=sig_r, s=sig_s)
    signature = r.tpm2b("sig", _MAX_RSA_BYTES)
    r.end()
    return TpmSignature(sig_alg=sig_alg, hash_alg=hash_alg, signature=signature)


@dataclass(frozen=True)
class TpmPublic:
    """A parsed RSA or ECC ``TPMT_PUBLIC``; ``raw`` is exactly the marshalled structure."""

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    # The key's signing scheme and its hash; TPM_ALG_NULL / None when the key leaves it open.
    scheme: int
    scheme_hash: int | None
    rsa_exponent: int = 0
    rsa_modulus: bytes = b""
    ecc_curve: int = 0
    ecc_x: bytes = b""
    ecc_y: bytes = b""
    raw: bytes = b""

    def has(self, attribute: int) -> bool:
        return bool(self.object_attributes & attribute)

    @property
    def name(self) -> bytes:
        """The TPM Name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        alg = HASH_NAMES.get(self.name_alg)
        if alg is None:
            raise EvidenceError(f"TPMT_PUBLIC nameAlg {alg_name(self.name_alg)} is not supported")
        return self.name_alg.to_bytes(2, "big") + hashlib.new(alg, self.raw).digest()

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        if self.type == TPM_ALG_RSA:
            exponent = self.rsa_exponent or 65537
            try:
                return rsa.RSAPublicNumbers(exponent, int.from_bytes(self.rsa_modulus, "big")).public_key()
            except ValueError as exc:
                raise EvidenceError(f"TPMT_PUBLIC RSA key is invalid: {exc}") from None
        curve: ec.EllipticCurve = ec.SECP256R1() if self.ecc_curve == TPM_ECC_NIST_P256 else ec.SECP384R1()
        x, y = int.from_bytes(self.ecc_x, "big"), int.from_bytes(self.ecc_y, "big")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError:
            raise EvidenceError("TPMT_PUBLIC ECC point is not on its curve") from None


def parse_public(data: bytes) -> TpmPublic:
    """Parse an RSA or ECC ``TPMT_PUBLIC`` (a TPM2B_PUBLIC's size prefix is accepted too)."""
    _bounded(data, MAX_PUBLIC_BYTES, "TPMT_PUBLIC")
    raw = bytes(data)
    try:
        return _public(raw)
    except EvidenceError:
        if len(raw) >= 2 and int.from_bytes(raw[:2], "big") == len(raw) - 2:
            return _public(raw[2:])
        raise


def _public(raw: bytes) -> TpmPublic:
    r = _Reader(raw, "TPMT_PUBLIC")
    kind = r.uint(2, "type")
    if kind not in (TPM_ALG_RSA, TPM_ALG_ECC):
        raise EvidenceError(f"TPMT_PUBLIC type {alg_name(kind)} is not an RSA or ECC key")
    name_alg = r.uint(2, "nameAlg")
    attributes = r.uint(4, "objectAttributes")
    auth_policy = r.tpm2b("authPolicy", _MAX_DIGEST)
    symmetric = r.uint(2, "parameters.symmetric.algorithm")
    if symmetric != TPM_ALG_NULL:
        r.take(4, "parameters.symmetric.keyBits/mode")
    scheme = r.uint(2, "parameters.scheme")
    scheme_hash: int | None = None
    if scheme not in (TPM_ALG_NULL, TPM_ALG_RSAES):
        scheme_hash = r.uint(2, "parameters.scheme.hashAlg")
        if scheme == TPM_ALG_ECDAA:
            r.take(2, "parameters.scheme.count")
    if kind == TPM_ALG_RSA:
        key_bits = r.uint(2, "parameters.keyBits")
        exponent = r.uint(4, "parameters.exponent")
        modulus = r.tpm2b("unique.rsa", _MAX_RSA_BYTES)
        r.end()
        if len(modulus) * 8 != key_bits:
            raise EvidenceError(f"TPMT_PUBLIC modulus is {len(modulus) * 8} bits, keyBits says {key_bits}")
        return TpmPublic(
            type=kind,
            name_alg=name_alg,
            object_attributes=attributes,
            auth_policy=auth_policy,
            scheme=scheme,
            scheme_hash=scheme_hash,
            rsa_exponent=exponent,
            rsa_modulus=modulus,
            raw=raw,
        )
    curve = r.uint(2, "parameters.curveID")
    kdf = r.uint(2, "parameters.kdf.scheme")
    if kdf != TPM_ALG_NULL:
        r.take(2, "parameters.kdf.hashAlg")
    x = r.tpm2b("unique.ecc.x", _MAX_ECC_BYTES)
    y = r.tpm2b("unique.ecc.y", _MAX_ECC_BYTES)
    r.end()
    known = ECC_CURVES.get(curve)
    if known is None:
        raise EvidenceError(f"TPMT_PUBLIC curveID {curve:#06x} is not NIST P-256 or P-384")
    if len(x) > known[1] or len(y) > known[1]:
        raise EvidenceError(f"TPMT_PUBLIC ECC point is longer than a {known[0]} coordinate")
    return TpmPublic(
        type=kind,
        name_alg=name_alg,
        object_attributes=attributes,
        auth_policy=auth_policy,
        scheme=scheme,
        scheme_hash=scheme_hash,
        ecc_curve=curve,
        ecc_x=x,
        ecc_y=y,
        raw=raw,
    )
