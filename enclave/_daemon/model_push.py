"""Receive the model from the custodian and open it in memory.

``FetchModel`` streams one header, then the at-rest ciphertext chunks. The data
key comes wrapped to this instance's attested key; the chunks open in order
into one buffer, and the whole plaintext must match the header's SHA-384.
Any failure refuses the model; nothing is written to disk.

Each chunk is decrypted as it arrives (AES-GCM with AES instructions is fast
enough to run on the event loop) and hashed in a worker thread while the next
one is received: one chunk's hash in flight, in order, so the stream and the
SHA-384 (the slow part) overlap.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from enclave._daemon.errors import ModelRefusedError
from enclave._daemon.measured import MeasuredIdentity
from enclave.envelope import MODEL_ID_SIZE, ModelOpener, unwrap_key, zeroize
from enclave.errors import EnvelopeError, FormatError
from protos import custos_pb2, custos_pb2_grpc

logger = logging.getLogger(__name__)

_SHA384_SIZE = 48


@dataclass
class PushedModel:
    """A decrypted model. ``wipe()`` it once the runtime holds its own copy, or ``hand_over()`` it
    to a runtime that keeps it (and wipes it when done)."""

    name: str
    sha384: bytes
    plaintext: bytearray

    def wipe(self) -> None:
        zeroize(self.plaintext)

    def hand_over(self) -> bytearray:
        plaintext, self.plaintext = self.plaintext, bytearray()
        return plaintext


async def receive_model(
    stub: custos_pb2_grpc.EnclaveGatewayAsyncStub,
    identity: MeasuredIdentity,
    instance_id: str,
    *,
    max_model_bytes: int,
    read_timeout: float,
) -> PushedModel:
    """Fetch and open the deployment's model; raise ``ModelRefusedError`` on anything amiss."""
    call = stub.FetchModel(custos_pb2.FetchModelRequest())
    opener: ModelOpener | None = None
    header: custos_pb2.ModelHeader | None = None
    # The chunk being hashed in a worker thread while the next one arrives.
    hashing: asyncio.Future[None] | None = None
    try:
        try:
            # read() gives grpc.aio.EOF, not a ModelPart, when the stream ends.
            while isinstance(part := await asyncio.wait_for(call.read(), read_timeout), custos_pb2.ModelPart):
                kind = part.WhichOneof("part")
                if header is None:
                    if kind != "header":
                        raise ModelRefusedError("model stream does not start with a header")
                    header = part.header
                    opener = _opener(header, identity, instance_id, max_model_bytes)
                elif kind == "chunk" and opener is not None:
                    chunk = part.chunk
                    # Decrypting a chunk takes about 0.1 ms a MiB here; hashing it ten times that.
                    index = opener.decrypt(chunk.index, chunk.final, chunk.ciphertext)
                    if hashing is not None:
                        await hashing
                    hashing = asyncio.ensure_future(asyncio.to_thread(opener.measure, index))
                else:
                    raise ModelRefusedError("model stream carries a second header")
            if hashing is not None:
                await hashing
                hashing = None
            if header is None or opener is None:
                raise ModelRefusedError("model stream is empty")
            plaintext = opener.finish()
        except EnvelopeError:
            raise ModelRefusedError("model envelope failed authentication") from None
        except grpc.aio.AioRpcError as exc:
            raise ModelRefusedError(f"model push failed: {exc.code().name}: {exc.details()}") from None
        except TimeoutError:
            raise ModelRefusedError(f"model push stalled for {read_timeout:g} s") from None
    except BaseException:
        if hashing is not None:
            # The worker thread cannot be interrupted: let it finish before wiping under it.
            await asyncio.gather(hashing, return_exceptions=True)
        if opener is not None:
            opener.wipe()
        raise
    finally:
        call.cancel()
    logger.info(
        "model %r received: %d bytes, SHA-384 %s (decrypt %.4f s, %.4f s CPU; SHA-384 %.4f s, %.4f s CPU)",
        header.name,
        len(plaintext),
        header.plaintext_sha384.hex(),
        opener.decrypting.wall_seconds,
        opener.decrypting.cpu_seconds,
        opener.hashing.wall_seconds,
        opener.hashing.cpu_seconds,
    )
    return PushedModel(name=header.name, sha384=bytes(header.plaintext_sha384), plaintext=plaintext)


def _opener(
    header: custos_pb2.ModelHeader, identity: MeasuredIdentity, instance_id: str, max_model_bytes: int
) -> ModelOpener:
    """Check the header's sizes before allocating or decrypting anything."""
    if header.plaintext_size > max_model_bytes:
        size = header.plaintext_size
        raise ModelRefusedError(f"model is {size} bytes, over the {max_model_bytes}-byte limit")
    if len(header.model_id) != MODEL_ID_SIZE or len(header.plaintext_sha384) != _SHA384_SIZE:
        raise ModelRefusedError("model header is malformed")
    data_key = unwrap_key(header.wrapped_key, identity.key, header.model_id + instance_id.encode())
    try:
        return ModelOpener(
            data_key,
            header.model_id,
            size=header.plaintext_size,
            chunk_size=header.chunk_size,
            chunk_count=header.chunk_count,
            sha384=header.plaintext_sha384,
        )
    except FormatError as exc:
        raise ModelRefusedError(f"model header is malformed: {exc}") from None
