from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave import envelope, identity
from enclave.envelope import ModelOpener, ModelSealer, SealedChunk
from enclave.errors import EnvelopeError

# Known-answer vector, computed once with this module and checked against an
# independent AES-GCM (pyca/cryptography's AESGCM called directly with the
# documented nonce and AAD layout), so a change to the format fails here.
KAT_KEY = bytes(range(32))
KAT_MODEL_ID = bytes(range(16))


def test_chunk_layout_matches_documented_nonce_and_aad() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    sealed = envelope.seal_chunk(KAT_KEY, KAT_MODEL_ID, 7, True, b"weights")
    nonce = (7).to_bytes(11, "big") + b"\x01"
    aad = b"custos-model/1" + KAT_MODEL_ID + (7).to_bytes(8, "big") + b"\x01"
    assert AESGCM(KAT_KEY).decrypt(nonce, sealed, aad) == b"weights"


def _seal(data: bytes, chunk_size: int) -> tuple[ModelSealer, list[SealedChunk]]:
    sealer = ModelSealer(KAT_KEY, KAT_MODEL_ID, chunk_size)
    chunks = list(sealer.update(data))
    chunks.append(sealer.finish())
    return sealer, chunks


def _open(data: bytes, chunk_size: int, chunks: list[SealedChunk], count: int | None = None) -> bytes:
    opener = ModelOpener(
        KAT_KEY,
        KAT_MODEL_ID,
        size=len(data),
        chunk_size=chunk_size,
        chunk_count=count if count is not None else len(chunks),
        sha384=hashlib.sha384(data).digest(),
    )
    for chunk in chunks:
        opener.add(chunk.index, chunk.final, chunk.ciphertext)
    return bytes(opener.finish())


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), chunk_size=st.integers(1, 700), pieces=st.integers(1, 5))
def test_round_trip_any_size_and_feed_pattern(data: bytes, chunk_size: int, pieces: int) -> None:
    sealer = ModelSealer(KAT_KEY, KAT_MODEL_ID, chunk_size)
    step = max(1, len(data) // pieces)
    chunks = [c for i in range(0, len(data), step) for c in sealer.update(data[i : i + step])]
    chunks.append(sealer.finish())
    assert sealer.sha384 == hashlib.sha384(data).digest()
    assert sealer.chunk_count == len(chunks) == max(1, -(-len(data) // chunk_size))
    assert _open(data, chunk_size, chunks) == data


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=2000), where=st.integers(0), bit=st.integers(0, 7))
def test_any_flipped_ciphertext_bit_is_rejected(data: bytes, where: int, bit: int) -> None:
    _, chunks = _seal(data, 256)
    victim = chunks[where % len(chunks)]
    flipped = bytearray(victim.ciphertext)
    flipped[(where // len(chunks)) % len(flipped)] ^= 1 << bit
    chunks[victim.index] = SealedChunk(victim.index, victim.final, bytes(flipped))
    with pytest.raises(EnvelopeError):
        _open(data, 256, chunks)


DATA = bytes(range(256)) * 10  # 2560 bytes, 5 chunks of 512


def _tamper(kind: str, chunks: list[SealedChunk]) -> tuple[list[SealedChunk], int | None]:
    if kind == "reordered":
        chunks[1], chunks[2] = chunks[2], chunks[1]
    elif kind == "reordered-with-relabelled-index":
        a, b = chunks[1], chunks[2]
        chunks[1], chunks[2] = SealedChunk(1, False, b.ciphertext), SealedChunk(2, False, a.ciphertext)
    elif kind == "dropped":
        count = len(chunks)
        del chunks[2]
        return chunks, count
    elif kind == "truncated":
        return chunks[:-1], len(chunks)
    elif kind == "final-flag-moved":
        last = chunks[-1]
        chunks[-1] = SealedChunk(last.index, False, last.ciphertext)
    elif kind == "duplicated":
        chunks.insert(2, chunks[1])
    return chunks, None


@pytest.mark.parametrize(
    "kind",
    [
        "reordered",
        "reordered-with-relabelled-index",
        "dropped",
        "truncated",
        "final-flag-moved",
        "duplicated",
    ],
)
def test_stream_tampering_is_rejected(kind: str) -> None:
    _, chunks = _seal(DATA, 512)
    tampered, count = _tamper(kind, chunks)
    with pytest.raises(EnvelopeError, match=r"^model envelope failed authentication$"):
        _open(DATA, 512, tampered, count)


def test_chunk_from_another_model_is_rejected() -> None:
    _, chunks = _seal(DATA, 512)
    other = ModelSealer(KAT_KEY, bytes(16), 512)
    foreign = [*other.update(DATA), other.finish()]
    chunks[0] = foreign[0]
    with pytest.raises(EnvelopeError):
        _open(DATA, 512, chunks)


def test_key_wrap_round_trip_and_refusals() -> None:
    key = identity.generate_identity_key()
    data_key = envelope.new_data_key()
    wrapped = envelope.wrap_key(data_key, key.public_key(), b"model|instance")
    assert envelope.unwrap_key(wrapped, key, b"model|instance") == data_key
    with pytest.raises(EnvelopeError):
        envelope.unwrap_key(wrapped, key, b"model|other-instance")
    with pytest.raises(EnvelopeError):
        envelope.unwrap_key(wrapped, identity.generate_identity_key(), b"model|instance")
    with pytest.raises(EnvelopeError):
        envelope.unwrap_key(wrapped[:-1], key, b"model|instance")
    with pytest.raises(EnvelopeError):
        envelope.unwrap_key(b"\x04" + bytes(64), key, b"model|instance")


def test_at_rest_wrap_is_bound_to_model_id() -> None:
    kek, data_key = envelope.new_data_key(), envelope.new_data_key()
    wrapped = envelope.seal_at_rest(kek, data_key, KAT_MODEL_ID)
    assert envelope.open_at_rest(kek, wrapped, KAT_MODEL_ID) == data_key
    with pytest.raises(EnvelopeError):
        envelope.open_at_rest(kek, wrapped, bytes(16))


def test_decrypt_and_measure_split_must_hash_every_chunk_in_order() -> None:
    data = bytes(range(256)) * 10
    _, chunks = _seal(data, 512)

    def opener() -> ModelOpener:
        return ModelOpener(
            KAT_KEY,
            KAT_MODEL_ID,
            size=len(data),
            chunk_size=512,
            chunk_count=len(chunks),
            sha384=hashlib.sha384(data).digest(),
        )

    whole = opener()
    for chunk in chunks:
        whole.measure(whole.decrypt(chunk.index, chunk.final, chunk.ciphertext))
    assert bytes(whole.finish()) == data
    for clock in (whole.decrypting, whole.hashing):
        assert clock.wall_seconds > 0
        assert clock.cpu_seconds > 0

    out_of_order = opener()
    first = out_of_order.decrypt(chunks[0].index, chunks[0].final, chunks[0].ciphertext)
    second = out_of_order.decrypt(chunks[1].index, chunks[1].final, chunks[1].ciphertext)
    with pytest.raises(EnvelopeError):
        out_of_order.measure(second)
    out_of_order.measure(first)
    with pytest.raises(EnvelopeError):
        out_of_order.measure(second + 1)  # not decrypted yet

    # Every chunk decrypted, the last one never hashed: the model is refused.
    unmeasured = opener()
    for chunk in chunks:
        index = unmeasured.decrypt(chunk.index, chunk.final, chunk.ciphertext)
        if not chunk.final:
            unmeasured.measure(index)
    with pytest.raises(EnvelopeError):
        unmeasured.finish()
