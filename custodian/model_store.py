"""The model store: models encrypted at rest, ready to be pushed as they are.

``add`` seals an uploaded model with a fresh data key (``enclave.envelope``),
stores the ciphertext chunks and records the model with its data key wrapped
by the key-encryption key. The plaintext is never written. Where the chunks
and the KEK live depends on the ledger:

- a single custodian (``ModelStore.open``): chunks back to back in
  ``models/<model id>.sealed`` (chunk ``i`` at offset ``i * (chunk_size +
  16)``, so the file needs no framing), the KEK in ``DATA/kek`` (0600);
- replicas (``ModelStore.shared``): chunks as rows of the PostgreSQL ledger
  (``custodian._sealed_rows``), which every replica reads; the KEK is shared,
  wrapped by the master key (``custodian.replica``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from custodian.config import check_name
from custodian.data_dir import PRIVATE_FILE, read_private, write_private
from custodian.errors import ConfigError, ConflictError, InvalidRequestError, LedgerError
from custodian.ledger import Ledger, ModelRecord
from custodian.model_check import ModelCheck, ModelInput, inputs_to_json
from enclave.envelope import (
    KEY_SIZE,
    TAG_SIZE,
    ModelSealer,
    SealedChunk,
    new_data_key,
    new_model_id,
    open_at_rest,
    seal_at_rest,
    wrap_key,
)

logger = logging.getLogger(__name__)


class LoadCheck(Protocol):
    """What ``ModelStore.add`` needs of a load check (``custodian.model_check.ModelCheck``)."""

    async def feed(self, part: bytes) -> None: ...
    async def result(self) -> tuple[ModelInput, ...]: ...
    async def stop(self) -> None: ...


StartCheck = Callable[[], Awaitable[LoadCheck]]


class SealedWriter(Protocol):
    """Where one model's ciphertext chunks go while it is added."""

    async def write(self, chunks: list[SealedChunk]) -> None: ...
    async def finish(self) -> None: ...
    async def discard(self) -> None: ...


class SealedStorage(Protocol):
    """Where sealed models are kept: files in the data directory, or rows every replica reads."""

    async def writer(self, model_id: bytes) -> SealedWriter: ...
    def chunks(self, model: ModelRecord) -> AsyncGenerator[SealedChunk, None]: ...
    async def remove(self, model_id: bytes) -> None: ...
    async def remove_orphans(self, known: set[bytes]) -> None: ...


class ModelStore:
    def __init__(
        self,
        sealed: SealedStorage,
        kek: bytes,
        ledger: Ledger,
        *,
        chunk_size: int,
        max_bytes: int,
        start_check: StartCheck = ModelCheck.start,
    ) -> None:
        self._sealed = sealed
        self._kek = kek
        self._ledger = ledger
        self._chunk_size = chunk_size
        self._max_bytes = max_bytes
        self._start_check = start_check

    @classmethod
    def open(
        cls,
        data_dir: Path,
        ledger: Ledger,
        *,
        chunk_size: int,
        max_bytes: int,
        start_check: StartCheck = ModelCheck.start,
    ) -> ModelStore:
        """The store in ``data_dir``; creates the key-encryption key and ``models/`` on first use."""
        kek_path = data_dir / "kek"
        if not kek_path.exists():
            write_private(kek_path, os.urandom(KEY_SIZE))
            logger.info("created the key-encryption key %s", kek_path)
        kek = read_private(kek_path)
        if len(kek) != KEY_SIZE:
            raise ConfigError(f"{kek_path} is not a {KEY_SIZE}-byte key")
        directory = data_dir / "models"
        directory.mkdir(mode=0o700, exist_ok=True)
        return cls(
            SealedFiles(directory),
            kek,
            ledger,
            chunk_size=chunk_size,
            max_bytes=max_bytes,
            start_check=start_check,
        )

    @classmethod
    def shared(
        cls,
        ledger: Ledger,
        kek: bytes,
        *,
        chunk_size: int,
        max_bytes: int,
        start_check: StartCheck = ModelCheck.start,
    ) -> ModelStore:
        """The store of replicas: chunks in the (PostgreSQL) ledger, the shared KEK."""
        from custodian._sealed_rows import SealedRows  # imports asyncpg: only for replicas

        return cls(
            SealedRows(ledger),
            kek,
            ledger,
            chunk_size=chunk_size,
            max_bytes=max_bytes,
            start_check=start_check,
        )

    async def add(
        self, name: str, data: AsyncIterable[bytes], *, actor: str, origin: str = ""
    ) -> ModelRecord:
        """Seal the streamed plaintext under a new data key and record the model, if it loads.

        The plaintext also goes to the load check as it arrives; a model the check refuses leaves
        nothing behind (its partial sealed file is removed, nothing is recorded or audited).
        """
        check_name("model", name)
        async with self._ledger.transaction() as tx:
            if await tx.model(name) is not None:
                raise ConflictError(f"model {name!r} already exists")
        data_key, model_id = new_data_key(), new_model_id()
        sealer = ModelSealer(data_key, model_id, self._chunk_size)
        writer = await self._sealed.writer(model_id)
        check = await self._start_check()
        try:
            try:
                async for part in data:
                    if sealer.size + len(part) > self._max_bytes:
                        raise InvalidRequestError(f"model is larger than the {self._max_bytes}-byte limit")
                    await check.feed(part)
                    await writer.write(await asyncio.to_thread(_seal, sealer, part))
                if sealer.size == 0:
                    raise InvalidRequestError("model is empty")
                inputs = await check.result()
                await writer.write([await asyncio.to_thread(sealer.finish)])
            finally:
                await check.stop()
            await writer.finish()
        except BaseException:
            await writer.discard()
            raise
        async with self._ledger.transaction() as tx:
            record = ModelRecord(
                model_id=model_id,
                name=name,
                sha384=sealer.sha384,
                size=sealer.size,
                chunk_size=self._chunk_size,
                chunk_count=sealer.chunk_count,
                wrapped_key=seal_at_rest(self._kek, data_key, model_id),
                created_at=tx.now,
                inputs=inputs_to_json(inputs),
                # A language model's unit is a token (its load check names its input kind 'language').
                kind="language" if any(i.kind == "language" for i in inputs) else "classifier",
            )
            try:
                await tx.add_model(record)
            except ConflictError:
                await self._sealed.remove(model_id)
                raise
            await tx.audit(
                actor,
                "model.add",
                name,
                {
                    "model_id": model_id.hex(),
                    "sha384": record.sha384.hex(),
                    "size": record.size,
                    "inputs": "; ".join(i.describe() for i in inputs),
                    **({"origin": origin} if origin else {}),
                },
            )
        logger.info("model %s added: %d bytes in %d chunks", name, record.size, record.chunk_count)
        return record

    async def models(self) -> list[ModelRecord]:
        async with self._ledger.transaction() as tx:
            return await tx.models()

    def chunks(self, model: ModelRecord) -> AsyncGenerator[SealedChunk, None]:
        """The stored ciphertext chunks, in order, exactly as they are at rest."""
        return self._sealed.chunks(model)

    def wrap_for(self, model: ModelRecord, public_key: bytes, instance_id: str) -> bytes:
        """The model's data key wrapped to an instance's attested key (SPKI DER)."""
        recipient = serialization.load_der_public_key(public_key)
        if not isinstance(recipient, ec.EllipticCurvePublicKey):
            raise LedgerError(f"instance {instance_id} has no EC key on record")
        data_key = open_at_rest(self._kek, model.wrapped_key, model.model_id)
        return wrap_key(data_key, recipient, model.model_id + instance_id.encode())

    async def remove_orphans(self) -> None:
        """Delete sealed models no model record names (left by a crash between write and commit)."""
        await self._sealed.remove_orphans({m.model_id for m in await self.models()})


class SealedFiles:
    """Sealed models as files in ``DATA/models``, one per model, chunks back to back."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _path(self, model_id: bytes) -> Path:
        return self._directory / f"{model_id.hex()}.sealed"

    async def writer(self, model_id: bytes) -> SealedWriter:
        path = self._path(model_id)
        partial = path.with_suffix(".partial")
        return _FileWriter(await asyncio.to_thread(_create, partial), partial, path)

    async def chunks(self, model: ModelRecord) -> AsyncGenerator[SealedChunk, None]:
        path = self._path(model.model_id)
        expected = model.size + model.chunk_count * TAG_SIZE
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except OSError as exc:
            raise LedgerError(f"the sealed file of model {model.name!r} is missing: {exc}") from exc
        with handle:
            if os.fstat(handle.fileno()).st_size != expected:
                raise LedgerError(f"the sealed file of model {model.name!r} has the wrong size")
            for index in range(model.chunk_count):
                start = index * model.chunk_size
                length = min(model.chunk_size, model.size - start) + TAG_SIZE
                ciphertext = await asyncio.to_thread(handle.read, length)
                yield SealedChunk(index, index == model.chunk_count - 1, ciphertext)

    async def remove(self, model_id: bytes) -> None:
        await asyncio.to_thread(self._path(model_id).unlink, missing_ok=True)

    async def remove_orphans(self, known: set[bytes]) -> None:
        await asyncio.to_thread(self._remove_orphans, known)

    def _remove_orphans(self, known: set[bytes]) -> None:
        for path in self._directory.iterdir():
            with contextlib.suppress(ValueError):
                if path.suffix == ".partial" or bytes.fromhex(path.stem) not in known:
                    logger.info("removing orphaned model file %s", path.name)
                    path.unlink()


class _FileWriter:
    def __init__(self, handle: BinaryIO, partial: Path, path: Path) -> None:
        self._handle = handle
        self._partial = partial
        self._path = path

    async def write(self, chunks: list[SealedChunk]) -> None:
        await asyncio.to_thread(self._handle.writelines, [c.ciphertext for c in chunks])

    async def finish(self) -> None:
        await asyncio.to_thread(self._handle.flush)
        await asyncio.to_thread(os.fsync, self._handle.fileno())
        self._handle.close()
        await asyncio.to_thread(self._partial.rename, self._path)

    async def discard(self) -> None:
        self._handle.close()
        await asyncio.to_thread(self._partial.unlink, missing_ok=True)


def _seal(sealer: ModelSealer, part: bytes) -> list[SealedChunk]:
    """Seal one uploaded part (off the event loop): the chunks it completed."""
    return list(sealer.update(part))


def _create(path: Path) -> BinaryIO:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, PRIVATE_FILE), "wb")
