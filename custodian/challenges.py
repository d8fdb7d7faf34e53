"""Stateless enrolment challenges: nonces and TPM credential challenges the custodian need not store.

An unauthenticated caller could fill any table of outstanding challenges (the
deployment a challenge is for is public), so none is kept. A nonce is
``random (16) || expiry (8, Unix seconds) || tag (16)``, the tag an HMAC-SHA256
over the deployment, the random part and the expiry. Checking it needs no
state; that it is used once is recorded by the enrolment that spends it
(``Transaction.spend``, kept a while past its expiry). A TPM credential
challenge's id carries the pending enrolment itself (deployment, the
credential's secret, the attested key, the AK, the expiry), sealed with
AES-256-GCM under another key, so only a holder of that key can read or forge
one.

Where the keys come from: a custodian on SQLite draws both at start and keeps
them in memory only, so a restart forgets them (outstanding challenges then
fail as unknown and the enclave enrols again). Replicas on PostgreSQL derive
both from the key-encryption key they share (``Challenges.shared``: HKDF-SHA256,
one label each): a challenge one replica issues, any replica checks, so an
enclave behind a load balancer may enrol wherever its calls land, and single
use still holds across them, recorded in the one ledger. (A holder of that key
could forge a credential challenge, but it already unwraps every model.)
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import math
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodian.errors import RefusedError

_RANDOM_SIZE = 16
_TAG_SIZE = 16
_EXPIRY = struct.Struct(">Q")
NONCE_SIZE = _RANDOM_SIZE + _EXPIRY.size + _TAG_SIZE
_NONCE_CONTEXT = b"custos enrolment nonce v1\x00"
_CREDENTIAL_CONTEXT = b"custos credential challenge v1"
_GCM_NONCE_SIZE = 12
# A sealed credential challenge is a few hundred bytes; anything longer is not one of ours.
MAX_CHALLENGE_ID = 4096
_FIELD = struct.Struct(">H")


@dataclass(frozen=True)
class PendingCredential:
    """Platform tpm: an enrolment that passed appraisal and waits for its credential's secret."""

    deployment: str
    secret: bytes
    public_key: bytes  # DER SubjectPublicKeyInfo of the attested key
    ak_public: bytes
    expires_at: datetime.datetime
    # What the ledger records once it is used: a digest of the sealed bytes, not of their text
    # (base64 has more than one text for the same bytes).
    spent_key: bytes


class Challenges:
    """Issues and checks nonces and credential challenges; keys are drawn at construction."""

    def __init__(
        self, *, ttl_seconds: int, mac_key: bytes | None = None, seal_key: bytes | None = None
    ) -> None:
        self._ttl = datetime.timedelta(seconds=ttl_seconds)
        self._mac_key = mac_key or os.urandom(32)
        self._seal = AESGCM(seal_key or os.urandom(32))

    @classmethod
    def shared(cls, secret: bytes, *, ttl_seconds: int) -> Challenges:
        """Keys derived from ``secret`` (HKDF-SHA256, one label each): alike in every replica holding it."""
        return cls(
            ttl_seconds=ttl_seconds,
            mac_key=_derive(secret, _NONCE_CONTEXT),
            seal_key=_derive(secret, _CREDENTIAL_CONTEXT),
        )

    # ------------------------------------------------------------------ nonces

    def nonce(self, deployment: str, now: datetime.datetime) -> bytes:
        random = os.urandom(_RANDOM_SIZE)
        expiry = _EXPIRY.pack(_seconds(now + self._ttl))
        return random + expiry + self._tag(deployment, random + expiry)

    def check_nonce(self, nonce: bytes, deployment: str, now: datetime.datetime) -> datetime.datetime:
        """The nonce's expiry; raises ``RefusedError`` unless this process issued it for ``deployment``.

        A nonce for another deployment fails its tag like a forged one: the tag covers the deployment.
        """
        if len(nonce) != NONCE_SIZE:
            raise RefusedError("nonce is unknown or was already used")
        body, tag = nonce[:-_TAG_SIZE], nonce[-_TAG_SIZE:]
        if not hmac.compare_digest(tag, self._tag(deployment, body)):
            raise RefusedError("nonce is unknown or was issued for another deployment")
        (expiry,) = _EXPIRY.unpack(body[_RANDOM_SIZE:])
        expires_at = datetime.datetime.fromtimestamp(expiry, datetime.UTC)
        if now > expires_at:
            raise RefusedError("nonce has expired")
        return expires_at

    def _tag(self, deployment: str, body: bytes) -> bytes:
        message = _NONCE_CONTEXT + _framed(deployment.encode()) + body
        return hmac.new(self._mac_key, message, hashlib.sha256).digest()[:_TAG_SIZE]

    # ----------------------------------------------------- credential challenges

    def seal_credential(
        self, deployment: str, secret: bytes, public_key: bytes, ak_public: bytes, now: datetime.datetime
    ) -> str:
        expires_at = now + self._ttl
        plain = b"".join(
            [
                _EXPIRY.pack(_seconds(expires_at)),
                *(_framed(field) for field in (deployment.encode(), secret, public_key, ak_public)),
            ]
        )
        gcm_nonce = os.urandom(_GCM_NONCE_SIZE)
        sealed = gcm_nonce + self._seal.encrypt(gcm_nonce, plain, _CREDENTIAL_CONTEXT)
        return base64.urlsafe_b64encode(sealed).decode()

    def open_credential(self, challenge_id: str, now: datetime.datetime) -> PendingCredential:
        """The pending enrolment a challenge id carries; ``RefusedError`` if forged, garbled or expired."""
        unknown = RefusedError("credential challenge is unknown or was already used")
        if not 0 < len(challenge_id) <= MAX_CHALLENGE_ID:
            raise unknown
        try:
            sealed = base64.b64decode(challenge_id.encode("ascii"), altchars=b"-_", validate=True)
            plain = self._seal.decrypt(
                sealed[:_GCM_NONCE_SIZE], sealed[_GCM_NONCE_SIZE:], _CREDENTIAL_CONTEXT
            )
        except (UnicodeEncodeError, binascii.Error, InvalidTag, ValueError):
            raise unknown from None
        (expiry,) = _EXPIRY.unpack_from(plain)
        deployment, secret, public_key, ak_public = _unframed(plain[_EXPIRY.size :], 4)
        expires_at = datetime.datetime.fromtimestamp(expiry, datetime.UTC)
        if now > expires_at:
            raise RefusedError("credential challenge has expired")
        return PendingCredential(
            deployment.decode(), secret, public_key, ak_public, expires_at, spent_key("credential", sealed)
        )


def spent_key(kind: str, value: bytes) -> bytes:
    """What the ledger records of a spent nonce or credential challenge: a digest, fixed in size."""
    return hashlib.sha256(kind.encode() + b"\x00" + value).digest()


def _seconds(moment: datetime.datetime) -> int:
    return math.ceil(moment.timestamp())  # rounded up: a challenge never lives shorter than its TTL


def _framed(field: bytes) -> bytes:
    return _FIELD.pack(len(field)) + field


def _unframed(data: bytes, count: int) -> list[bytes]:
    fields, offset = [], 0
    for _ in range(count):
        (size,) = _FIELD.unpack_from(data, offset)
        offset += _FIELD.size
        fields.append(data[offset : offset + size])
        offset += size
    return fields


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"key for " + label).derive(secret)
