"""Sealed models as rows of the PostgreSQL ledger, which every replica reads (``custodian.model_store``).

A model's chunks are written as it is uploaded, one short transaction per
upload part, before its record is; a failed upload removes them. Chunks no
record names and older than ``ORPHAN_AGE_SECONDS`` (a crash between the chunks
and the record) are removed at start: younger ones may be another replica's
upload in progress.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from custodian._ledger_postgres import PostgresTransaction
from custodian.errors import ConfigError, LedgerError
from custodian.ledger import Ledger, ModelRecord, Transaction
from enclave.envelope import SealedChunk

ORPHAN_AGE_SECONDS = 24 * 3600.0


def _rows(tx: Transaction) -> PostgresTransaction:
    if not isinstance(tx, PostgresTransaction):
        raise ConfigError("sealed models in the ledger need a PostgreSQL ledger")
    return tx


class SealedRows:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def writer(self, model_id: bytes) -> _RowWriter:
        return _RowWriter(self._ledger, model_id)

    async def chunks(self, model: ModelRecord) -> AsyncGenerator[SealedChunk, None]:
        for index in range(model.chunk_count):
            async with self._ledger.transaction() as tx:
                ciphertext = await _rows(tx).sealed_chunk(model.model_id, index)
            if ciphertext is None:
                raise LedgerError(f"chunk {index} of model {model.name!r} is missing from the ledger")
            yield SealedChunk(index, index == model.chunk_count - 1, ciphertext)

    async def remove(self, model_id: bytes) -> None:
        async with self._ledger.transaction() as tx:
            await _rows(tx).remove_sealed(model_id)

    async def remove_orphans(self, known: set[bytes]) -> None:
        async with self._ledger.transaction() as tx:
            await _rows(tx).remove_orphaned_chunks(tx.now.timestamp() - ORPHAN_AGE_SECONDS)


class _RowWriter:
    def __init__(self, ledger: Ledger, model_id: bytes) -> None:
        self._ledger = ledger
        self._model_id = model_id

    async def write(self, chunks: list[SealedChunk]) -> None:
        if not chunks:
            return
        async with self._ledger.transaction() as tx:
            for chunk in chunks:
                await _rows(tx).add_sealed_chunk(self._model_id, chunk.index, chunk.ciphertext)

    async def finish(self) -> None:
        """Each write was committed: nothing is left to make durable."""

    async def discard(self) -> None:
        async with self._ledger.transaction() as tx:
            await _rows(tx).remove_sealed(self._model_id)
