"""Model envelope: chunked AES-256-GCM at rest and in transit, and key wrapping.

Chunk ``i`` of model ``m`` is sealed under the model's data key with

    nonce = i as 11 bytes big-endian || final flag (1 byte)
    aad   = b"custos-model/1" || m (16 bytes) || i (8 bytes) || final flag

so a chunk cannot be moved, dropped, duplicated or marked final elsewhere, and
a stream that stops before its final chunk is detectably truncated. Each data
key seals exactly one model, so deterministic nonces never repeat under a key.

The data key travels wrapped: at rest by the custodian's key-encryption key,
in transit to one enclave instance's attested P-256 key (ephemeral ECDH,
HKDF-SHA256, AES-256-GCM; HPKE-style). Every failure is ``EnvelopeError``.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave.errors import EnvelopeError, FormatError
from enclave.identity import public_key_der

KEY_SIZE = 32
MODEL_ID_SIZE = 16
TAG_SIZE = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
_CHUNK_LABEL = b"custos-model/1"
_WRAP_LABEL = b"custos-wrap/1"
_AT_REST_LABEL = b"custos-kek/1"
_P256_POINT_SIZE = 65


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def new_model_id() -> bytes:
    return os.urandom(MODEL_ID_SIZE)


def chunk_nonce_aad(model_id: bytes, index: int, final: bool) -> tuple[bytes, bytes]:
    """The AES-GCM nonce and associated data of chunk ``index`` (module notes)."""
    if len(model_id) != MODEL_ID_SIZE:
        raise FormatError("model id must be 16 bytes")
    if not 0 <= index < 1 << 64:
        raise FormatError("chunk index out of range")
    flag = b"\x01" if final else b"\x00"
    return index.to_bytes(11, "big") + flag, _CHUNK_LABEL + model_id + index.to_bytes(8, "big") + flag


def seal_chunk(key: bytes, model_id: bytes, index: int, final: bool, plaintext: bytes) -> bytes:
    nonce, aad = chunk_nonce_aad(model_id, index, final)
    return AESGCM(key).encrypt(nonce, plaintext, aad)


@dataclass(frozen=True)
class SealedChunk:
    index: int
    final: bool
    ciphertext: bytes


@dataclass
class ModelSealer:
    """Seals a plaintext stream chunk by chunk, holding back one chunk to mark the final one."""

    key: bytes
    model_id: bytes
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise FormatError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes")
        self._buffer = bytearray()
        self._index = 0
        self._sha384 = hashlib.sha384()
        self._size = 0

    def update(self, data: bytes) -> Iterator[SealedChunk]:
        self._buffer += data
        self._sha384.update(data)
        self._size += len(data)
        # Keep at least one full chunk back: it may turn out to be the last one.
        while len(self._buffer) > self.chunk_size:
            yield self._seal(bytes(self._buffer[: self.chunk_size]), final=False)
            del self._buffer[: self.chunk_size]

    def finish(self) -> SealedChunk:
        chunk = self._seal(bytes(self._buffer), final=True)
        self._buffer.clear()
        return chunk

    @property
    def sha384(self) -> bytes:
        return self._sha384.digest()

    @property
    def size(self) -> int:
        return self._size

    @property
    def chunk_count(self) -> int:
        return self._index

    def _seal(self, plaintext: bytes, *, final: bool) -> SealedChunk:
        chunk = SealedChunk(
            self._index, final, seal_chunk(self.key, self.model_id, self._index, final, plaintext)
        )
        self._index += 1
        return chunk


@dataclass
class StageClock:
    """Time one stage has taken so far: wall clock, and CPU time of the threads that ran it.

    The two differ when the stage's thread waits for a core (other threads or
    processes busy): CPU time is the stage's own cost.
    """

    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.cpu_seconds += time.thread_time() - cpu
            self.wall_seconds += time.perf_counter() - wall


class ModelOpener:
    """Opens chunks in order into one preallocated buffer and checks the whole model.

    The plaintext lives only in this object's memory; nothing is written to disk.
    Each chunk is decrypted in place (``AESGCM.decrypt_into``) and hashed as it
    opens, so ``finish`` only compares the SHA-384: the plaintext is read once.
    ``add`` does both; a caller that wants them to overlap calls ``decrypt``
    for each chunk and ``measure`` for each chunk decrypted, in order, one call
    of each at a time (``measure`` may run in a worker thread: hashing releases
    the GIL). A chunk left unmeasured fails ``finish``.
    """

    def __init__(
        self, key: bytes, model_id: bytes, *, size: int, chunk_size: int, chunk_count: int, sha384: bytes
    ) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_SIZE or chunk_count < 1 or size < 0:
            raise FormatError("model header has impossible sizes")
        if size > chunk_size * chunk_count or size < chunk_size * (chunk_count - 1):
            raise FormatError("model size does not fit its chunk count")
        self._aead = AESGCM(key)
        self._model_id = model_id
        self._chunk_size = chunk_size
        self._chunk_count = chunk_count
        self._sha384 = sha384
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._hash = hashlib.sha384()
        self._next = 0  # the next chunk to decrypt
        self._measured = 0  # chunks hashed so far
        self._done = False
        # Time spent in each stage so far, for the log and the benchmarks.
        self.decrypting = StageClock()
        self.hashing = StageClock()

    def add(self, index: int, final: bool, ciphertext: bytes) -> None:
        self.measure(self.decrypt(index, final, ciphertext))

    def decrypt(self, index: int, final: bool, ciphertext: bytes) -> int:
        """Decrypt chunk ``index`` into its place; returns ``index`` for ``measure``."""
        if self._done or index != self._next or final != (index == self._chunk_count - 1):
            raise EnvelopeError()
        nonce, aad = chunk_nonce_aad(self._model_id, index, final)
        target = self._chunk(index)
        if len(ciphertext) != len(target) + TAG_SIZE:
            raise EnvelopeError()
        try:
            with self.decrypting.timing():
                self._aead.decrypt_into(nonce, ciphertext, aad, target)
        except (InvalidTag, ValueError):
            zeroize(target)
            raise EnvelopeError() from None
        self._next += 1
        self._done = final
        return index

    def measure(self, index: int) -> None:
        """Hash decrypted chunk ``index`` into the model's SHA-384 (chunks in order)."""
        if index != self._measured or index >= self._next:
            raise EnvelopeError()
        with self.hashing.timing():
            self._hash.update(self._chunk(index))
        self._measured += 1

    def _chunk(self, index: int) -> memoryview:
        start = index * self._chunk_size
        return self._view[start : start + min(self._chunk_size, len(self._buffer) - start)]

    def finish(self) -> bytearray:
        """The whole plaintext, after checking that every chunk came and the SHA-384 matches."""
        complete = self._done and self._measured == self._chunk_count
        if not complete or not hmac.compare_digest(self._hash.digest(), self._sha384):
            self.wipe()
            raise EnvelopeError()
        return self._buffer

    def wipe(self) -> None:
        zeroize(self._view)


def zeroize(buffer: memoryview | bytearray) -> None:
    """Overwrite ``buffer`` with zeros in place (no second buffer of its size; the GIL is released)."""
    view = memoryview(buffer).cast("B")
    if len(view):
        ctypes.memset((ctypes.c_char * len(view)).from_buffer(view), 0, len(view))


def seal_at_rest(kek: bytes, data_key: bytes, model_id: bytes) -> bytes:
    """Wrap a data key under the custodian's key-encryption key."""
    nonce = os.urandom(12)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _AT_REST_LABEL + model_id)


def open_at_rest(kek: bytes, wrapped: bytes, model_id: bytes) -> bytes:
    try:
        return AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], _AT_REST_LABEL + model_id)
    except (InvalidTag, ValueError):
        raise EnvelopeError() from None


def _wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=_WRAP_LABEL + context).derive(
        shared + ephemeral + recipient
    )


def wrap_key(data_key: bytes, recipient: ec.EllipticCurvePublicKey, context: bytes) -> bytes:
    """Wrap ``data_key`` so only the holder of ``recipient``'s private key can open it.

    ``context`` (model id and instance id) is bound into the key derivation and the AEAD.
    """
    if not isinstance(recipient.curve, ec.SECP256R1):
        raise FormatError("recipient key must be P-256")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    eph_point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    wrapping = _wrap_key(
        ephemeral.exchange(ec.ECDH(), recipient), eph_point, public_key_der(recipient), context
    )
    return eph_point + AESGCM(wrapping).encrypt(bytes(12), data_key, context)


def unwrap_key(wrapped: bytes, recipient: ec.EllipticCurvePrivateKey, context: bytes) -> bytes:
    try:
        eph_point, sealed = wrapped[:_P256_POINT_SIZE], wrapped[_P256_POINT_SIZE:]
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), eph_point)
        shared = recipient.exchange(ec.ECDH(), ephemeral)
        wrapping = _wrap_key(shared, eph_point, public_key_der(recipient), context)
        return AESGCM(wrapping).decrypt(bytes(12), sealed, context)
    except (InvalidTag, ValueError):
        raise EnvelopeError() from None
