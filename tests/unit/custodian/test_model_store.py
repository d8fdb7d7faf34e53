"""The model store: sealed at rest, no plaintext on disk, pushed chunks open with the envelope."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from custodian.errors import ConflictError, InvalidRequestError, LedgerError
from enclave.envelope import ModelOpener, unwrap_key
from enclave.errors import EnvelopeError
from enclave.identity import generate_identity_key, public_key_der
from tests.unit.custodian.harness import custody


def test_a_model_is_sealed_at_rest_and_opens_for_the_attested_key(tmp_path: Path) -> None:
    model = os.urandom(10_000)
    enclave_key = generate_identity_key()

    async def scenario() -> None:
        async with custody(tmp_path, model_chunk_size=4096) as c:
            record = await c.upload("net", model)
            assert (record.size, record.chunk_count, record.chunk_size) == (10_000, 3, 4096)
            sealed = (tmp_path / "models" / f"{record.model_id.hex()}.sealed").read_bytes()
            assert model[:64] not in sealed
            assert len(sealed) == 10_000 + 3 * 16
            wrapped = c.store.wrap_for(record, public_key_der(enclave_key), "instance-1")
            key = unwrap_key(wrapped, enclave_key, record.model_id + b"instance-1")
            opener = ModelOpener(
                key,
                record.model_id,
                size=record.size,
                chunk_size=record.chunk_size,
                chunk_count=record.chunk_count,
                sha384=record.sha384,
            )
            async for chunk in c.store.chunks(record):
                opener.add(chunk.index, chunk.final, chunk.ciphertext)
            assert bytes(opener.finish()) == model
            with pytest.raises(EnvelopeError):
                # Bound to the instance: another instance id does not open it.
                unwrap_key(wrapped, enclave_key, record.model_id + b"instance-2")
            async with c.ledger.transaction() as tx:
                entries = await tx.audit_entries()
            assert [e.action for e in entries] == ["model.add"]

    asyncio.run(scenario())
    assert stat.S_IMODE((tmp_path / "kek").stat().st_mode) == 0o600


async def _parts(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize(
    ("name", "parts", "error"),
    [
        ("empty", [], InvalidRequestError),
        ("big", [b"x" * 600, b"x" * 600], InvalidRequestError),
        ("bad name", [b"x"], InvalidRequestError),
    ],
    ids=["empty", "over-limit", "bad-name"],
)
def test_refused_uploads_leave_no_file(
    tmp_path: Path, name: str, parts: list[bytes], error: type[Exception]
) -> None:
    async def scenario() -> None:
        async with custody(tmp_path, max_model_bytes=1000) as c:
            with pytest.raises(error):
                await c.store.add(name, _parts(*parts), actor="admin")
            assert await c.store.models() == []

    asyncio.run(scenario())
    assert list((tmp_path / "models").iterdir()) == []


def test_a_name_is_taken_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            await c.upload("net", b"abc")
            with pytest.raises(ConflictError):
                await c.upload("net", b"def")

    asyncio.run(scenario())
    assert len(list((tmp_path / "models").iterdir())) == 1


def test_a_damaged_sealed_file_is_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            record = await c.upload("net", b"abcdef")
            path = tmp_path / "models" / f"{record.model_id.hex()}.sealed"
            path.write_bytes(path.read_bytes()[:-1])
            with pytest.raises(LedgerError, match="wrong size"):
                [chunk async for chunk in c.store.chunks(record)]

    asyncio.run(scenario())


def test_orphans_from_a_crash_are_removed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with custody(tmp_path) as c:
            record = await c.upload("net", b"abcdef")
            (tmp_path / "models" / f"{bytes(16).hex()}.sealed").write_bytes(b"left over")
            (tmp_path / "models" / f"{bytes(16).hex()}.partial").write_bytes(b"half")
            await c.store.remove_orphans()
            assert [p.name for p in (tmp_path / "models").iterdir()] == [f"{record.model_id.hex()}.sealed"]

    asyncio.run(scenario())
