"""The AWS Nitro attestation document: a COSE_Sign1 (RFC 9052) whose payload is a CBOR map.

Both Nitro Enclaves (through the Nitro Secure Module) and NitroTPM (EC2
instance attestation) produce it. The document is the CBOR array
``[protected, unprotected, payload, signature]``, untagged in practice (tag 18
is accepted too): ``protected`` is the encoded map ``{1: -35}`` (ES384),
``unprotected`` an empty map, ``signature`` 96 bytes of r‖s over the
``Signature1`` structure. The payload fields and their limits are those of
AWS's ``attestation_process.md`` (aws-nitro-enclaves-nsm-api), in that order:

* ``module_id`` text, not empty; ``digest`` the text ``"SHA384"``;
  ``timestamp`` milliseconds since the Unix epoch;
* ``pcrs`` (Nitro Enclaves, indices 0-31) or ``nitrotpm_pcrs`` (NitroTPM,
  indices 0-23): 1 to 32 entries of 48 bytes;
* ``certificate`` DER, 1 to 1,024 bytes; ``cabundle`` 1 or more DER
  certificates, each 1 to 1,024 bytes, the root first;
* ``public_key``, ``user_data``, ``nonce``: optional (absent or null), at most
  1,024 bytes each.

This module only parses and enforces sizes, before any cryptography runs; the
chain and signature are checked by :mod:`enclave.attestation.nitro`.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import cbor2

from enclave.errors import EvidenceError

MAX_DOCUMENT_BYTES = 32 * 1024
MAX_FIELD_BYTES = 1024
PCR_SIZE = 48  # SHA-384
ES384 = -35
COSE_SIGN1_TAG = 18
ENCLAVE_PCRS_FIELD = "pcrs"
TPM_PCRS_FIELD = "nitrotpm_pcrs"
# The PCR indices each kind of document may carry.
IMAGE_PCRS = (0, 1, 2)
MAX_PCR_INDEX = {ENCLAVE_PCRS_FIELD: 31, TPM_PCRS_FIELD: 23}
_KNOWN_FIELDS = frozenset(
    {
        "module_id",
        "digest",
        "timestamp",
        ENCLAVE_PCRS_FIELD,
        TPM_PCRS_FIELD,
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
    }
)


@dataclass(frozen=True)
class AttestationDocument:
    """A parsed document: every payload field, and the bytes its signature covers."""

    module_id: str
    digest: str
    timestamp_ms: int
    pcrs_field: str  # "pcrs" (Nitro Enclaves) or "nitrotpm_pcrs" (NitroTPM)
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    protected: bytes
    payload: bytes
    signature: bytes

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)

    @property
    def is_tpm(self) -> bool:
        return self.pcrs_field == TPM_PCRS_FIELD

    def signed_bytes(self) -> bytes:
        """The COSE ``Sig_structure``: ``["Signature1", protected, external_aad = h'', payload]``."""
        return bytes(cbor2.dumps(["Signature1", self.protected, b"", self.payload]))

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-friendly (bytes as hex)."""

        def _hex(value: bytes | None) -> str | None:
            return None if value is None else value.hex()

        return {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp_ms": self.timestamp_ms,
            "timestamp": self.timestamp.isoformat(),
            "pcrs_field": self.pcrs_field,
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
            "public_key": _hex(self.public_key),
            "user_data": _hex(self.user_data),
            "nonce": _hex(self.nonce),
        }


def decode_document_text(data: bytes) -> bytes:
    """Raw CBOR as it is; base64 text (what tools print) decoded. Raises ``EvidenceError``."""
    if len(data) > 2 * MAX_DOCUMENT_BYTES:
        raise EvidenceError(f"Nitro attestation document file is {len(data)} bytes, over the limit")
    if data[:1] in (b"\x84", b"\xd2"):  # a CBOR array of four, or tag 18
        return data
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError("Nitro attestation document is neither CBOR nor base64") from None


def _decode_cbor(data: bytes, what: str) -> Any:
    """One CBOR item that takes up all of ``data``."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # a third-party decoder on hostile bytes: any failure of it is a bad document
        raise EvidenceError(f"{what} is not valid CBOR: {type(exc).__name__}") from None
    if stream.tell() != len(data):
        raise EvidenceError(f"{what} has {len(data) - stream.tell()} bytes after its CBOR item")
    return item


def parse_document(data: bytes) -> AttestationDocument:
    """Parse a COSE_Sign1 Nitro attestation document; raise ``EvidenceError`` naming what is wrong."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise EvidenceError(
            f"Nitro attestation document is {len(data)} bytes, over the {MAX_DOCUMENT_BYTES}-byte limit"
        )
    outer = _decode_cbor(data, "Nitro attestation document")
    if isinstance(outer, cbor2.CBORTag):
        if outer.tag != COSE_SIGN1_TAG:
            raise EvidenceError(f"Nitro attestation document has CBOR tag {outer.tag}, not COSE_Sign1 (18)")
        outer = outer.value
    if not isinstance(outer, list) or len(outer) != 4:
        raise EvidenceError("Nitro attestation document is not a COSE_Sign1 array of four items")
    protected, unprotected, payload, signature = outer
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise EvidenceError("COSE_Sign1 protected header, payload and signature must be byte strings")
    if unprotected is not None and (not isinstance(unprotected, dict) or unprotected):
        raise EvidenceError("COSE_Sign1 unprotected header must be empty")
    header = _decode_cbor(protected, "COSE_Sign1 protected header")
    if not isinstance(header, dict) or header != {1: ES384}:
        raise EvidenceError(
            f"COSE_Sign1 protected header is {_shown(header)}, not {{1: -35}} (algorithm ES384)"
        )
    if len(signature) != 96:
        raise EvidenceError(f"COSE_Sign1 signature is {len(signature)} bytes, not 96 (ES384 r and s)")
    fields = _decode_cbor(payload, "Nitro attestation document payload")
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise EvidenceError("Nitro attestation document payload is not a map of named fields")
    unknown = sorted(set(fields) - _KNOWN_FIELDS)
    if unknown:
        raise EvidenceError(f"Nitro attestation document has unknown fields: {', '.join(unknown[:5])}")
    pcrs_field, pcrs = _pcrs(fields)
    return AttestationDocument(
        module_id=_text(fields, "module_id"),
        digest=_digest(fields),
        timestamp_ms=_timestamp(fields),
        pcrs_field=pcrs_field,
        pcrs=pcrs,
        certificate=_bytes(fields, "certificate", optional=False, minimum=1),
        cabundle=_cabundle(fields),
        public_key=_optional(fields, "public_key"),
        user_data=_optional(fields, "user_data"),
        nonce=_optional(fields, "nonce"),
        protected=protected,
        payload=payload,
        signature=signature,
    )


def _shown(value: object) -> str:
    """A value as an error message may quote it: short, and never a huge integer's digits (Python refuses
    to print an integer of over 4,300 digits, with a ValueError of its own)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit integer"
    if isinstance(value, dict | list | tuple | set | frozenset):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise EvidenceError(f"Nitro attestation document {name} must be non-empty text")
    if len(value.encode()) > MAX_FIELD_BYTES:
        raise EvidenceError(f"Nitro attestation document {name} is over {MAX_FIELD_BYTES} bytes")
    return value


def _digest(fields: Mapping[str, Any]) -> str:
    digest = fields.get("digest")
    if digest != "SHA384":
        raise EvidenceError(f"Nitro attestation document digest is {_shown(digest)}, not 'SHA384'")
    return "SHA384"


def _timestamp(fields: Mapping[str, Any]) -> int:
    value = fields.get("timestamp")
    # Milliseconds; anything before 2019 (the Nitro root's birth) or past 9999 is not a Nitro time.
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1_500_000_000_000 <= value < 253402300800000
    ):
        raise EvidenceError(
            f"Nitro attestation document timestamp {_shown(value)} is not a time in milliseconds since 1970"
        )
    return value


def _pcrs(fields: Mapping[str, Any]) -> tuple[str, Mapping[int, bytes]]:
    present = [name for name in (ENCLAVE_PCRS_FIELD, TPM_PCRS_FIELD) if name in fields]
    if len(present) != 1:
        raise EvidenceError("Nitro attestation document must carry exactly one of pcrs and nitrotpm_pcrs")
    name = present[0]
    raw = fields[name]
    if not isinstance(raw, dict) or not 1 <= len(raw) <= 32:
        raise EvidenceError(f"Nitro attestation document {name} must map 1 to 32 PCR indices to values")
    pcrs: dict[int, bytes] = {}
    for index, value in raw.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_PCR_INDEX[name]:
            raise EvidenceError(
                f"Nitro attestation document {name} index {_shown(index)} is not 0-{MAX_PCR_INDEX[name]}"
            )
        if not isinstance(value, bytes) or len(value) != PCR_SIZE:
            raise EvidenceError(
                f"Nitro attestation document {name}[{index}] is not {PCR_SIZE} bytes (SHA-384)"
            )
        pcrs[index] = value
    if name == ENCLAVE_PCRS_FIELD and not all(i in pcrs for i in IMAGE_PCRS):
        raise EvidenceError("Nitro Enclaves document lacks PCRs 0-2 (the enclave image, kernel, application)")
    return name, MappingProxyType(dict(sorted(pcrs.items())))


def _bytes(fields: Mapping[str, Any], name: str, *, optional: bool, minimum: int = 0) -> bytes:
    value = fields.get(name)
    if not isinstance(value, bytes) or not minimum <= len(value) <= MAX_FIELD_BYTES:
        raise EvidenceError(
            f"Nitro attestation document {name} must be {minimum} to {MAX_FIELD_BYTES} bytes"
            + (" or absent" if optional else "")
        )
    return value


def _optional(fields: Mapping[str, Any], name: str) -> bytes | None:
    if fields.get(name) is None:
        return None
    return _bytes(fields, name, optional=True)


def _cabundle(fields: Mapping[str, Any]) -> tuple[bytes, ...]:
    bundle = fields.get("cabundle")
    if not isinstance(bundle, list) or not bundle:
        raise EvidenceError("Nitro attestation document cabundle must list the CA certificates, root first")
    if len(bundle) > 8:
        raise EvidenceError(f"Nitro attestation document cabundle holds {len(bundle)} certificates, over 8")
    for i, certificate in enumerate(bundle):
        if not isinstance(certificate, bytes) or not 1 <= len(certificate) <= MAX_FIELD_BYTES:
            raise EvidenceError(
                f"Nitro attestation document cabundle[{i}] must be a DER certificate of 1 to"
                f" {MAX_FIELD_BYTES} bytes"
            )
    return tuple(bundle)
