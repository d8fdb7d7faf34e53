"""`model add FILE.gguf`: converted in the console, checked by the enclave loader (it generates), sealed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos import custos_pb2 as pb
from tests.integration.custodian.harness import running
from tests.unit.llm.test_genai_folder import write_folder
from tests.unit.llm.tiny_llama.make import GGUF_PATH, write_gguf

pytestmark = pytest.mark.integration


def _console(tmp_path: Path, *words: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "custodian.cli", "--data", str(tmp_path / "data"), *words]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_a_gguf_is_converted_with_progress_checked_sealed_and_listed_as_a_language_model(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[subprocess.CompletedProcess[str], ...]:
        async with running(tmp_path):
            added = await asyncio.to_thread(
                _console, tmp_path, "model", "add", str(GGUF_PATH), "--name", "tiny"
            )
            listed = await asyncio.to_thread(_console, tmp_path, "model", "list", "--json")
            table = await asyncio.to_thread(_console, tmp_path, "model", "list")
            return added, listed, table

    added, listed, table = asyncio.run(scenario())
    assert added.returncode == 0, added.stderr
    assert "layer 2/2" in added.stderr
    assert added.stdout.startswith("language model tiny loads, generates (input tokens int64[128] language)")
    [model] = json.loads(listed.stdout)
    assert (model["name"], model["kind"], model["inputs"]) == (
        "tiny",
        "language",
        "tokens int64[128] language",
    )
    assert "KIND" in table.stdout
    assert " language " in table.stdout
    [sealed] = (tmp_path / "data" / "models").iterdir()
    assert b"custos tiny llama" not in sealed.read_bytes()


def test_an_unsupported_architecture_is_one_line_naming_the_supported_ones(tmp_path: Path) -> None:
    phi = tmp_path / "phi.gguf"
    write_gguf(phi, architecture="phi3")
    done = _console(tmp_path, "model", "add", str(phi))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("custodian: GGUF architecture 'phi3' is not supported; supported: llama (")
    assert "Traceback" not in done.stderr


def _upload(name: str, data: bytes) -> AsyncIterator[pb.ModelUpload]:
    async def parts() -> AsyncIterator[pb.ModelUpload]:
        yield pb.ModelUpload(name=name)
        for i in range(0, len(data), 1 << 16):
            yield pb.ModelUpload(data=data[i : i + (1 << 16)])

    return parts()


def test_a_language_model_bundle_that_does_not_load_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    broken = b"CUSTOSLM" + bytes(200)

    async def scenario() -> None:
        async with running(tmp_path) as r:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await r.admin.AddModel(_upload("bad", broken))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "language model bundle: " in str(refused.value.details())
            assert list((tmp_path / "data" / "models").iterdir()) == []

    asyncio.run(scenario())


def test_an_onnxruntime_genai_folder_is_added_as_a_language_model(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "tiny-genai")

    async def scenario() -> subprocess.CompletedProcess[str]:
        async with running(tmp_path):
            return await asyncio.to_thread(_console, tmp_path, "model", "add", str(folder), "--json")

    done = asyncio.run(scenario())
    assert done.returncode == 0, done.stderr
    added = json.loads(done.stdout)
    assert (added["name"], added["kind"], added["inputs"]) == (
        "tiny-genai",
        "language",
        "tokens int64[128] language",
    )


def test_keep_gguf_blocks_is_misuse_for_anything_but_a_gguf_file(tmp_path: Path) -> None:
    done = _console(tmp_path, "model", "add", str(write_folder(tmp_path / "folder")), "--keep-gguf-blocks")
    assert done.returncode == 1
    assert "--keep-gguf-blocks is for a GGUF file" in done.stderr
