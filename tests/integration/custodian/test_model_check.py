"""`model add` refuses a model the enclave could not load, and records what a good one takes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from protos import custos_pb2 as pb
from testkit.processes import DIGITS_MODEL
from tests.integration.custodian.harness import running

pytestmark = pytest.mark.integration


def _upload(name: str, data: bytes) -> AsyncIterator[pb.ModelUpload]:
    async def parts() -> AsyncIterator[pb.ModelUpload]:
        yield pb.ModelUpload(name=name)
        for i in range(0, len(data), 4096):
            yield pb.ModelUpload(data=data[i : i + 4096])

    return parts()


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 40,
        b"this is a text file, not a model\n" * 100,
        DIGITS_MODEL.read_bytes()[: len(DIGITS_MODEL.read_bytes()) // 2],
    ],
    ids=["random-bytes", "text-file", "truncated-model"],
)
def test_a_model_that_does_not_load_is_refused_and_nothing_is_stored(tmp_path: Path, data: bytes) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await r.admin.AddModel(_upload("bad", data))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not load in onnxruntime" in str(refused.value.details())
            assert "nothing was stored" in str(refused.value.details())
            assert list((tmp_path / "data" / "models").iterdir()) == []
            assert list((await r.admin.ListModels(pb.ListModelsRequest())).models) == []
            ledger = r.server._ledger
            assert ledger is not None
            async with ledger.transaction() as tx:
                assert [e.action for e in await tx.audit_entries()] == []

    asyncio.run(scenario())


def test_a_model_that_loads_is_listed_with_its_input(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            added = await r.admin.AddModel(_upload("digits", DIGITS_MODEL.read_bytes()))
            assert added.inputs == "image float[?,1,8,8] image"
            [listed] = (await r.admin.ListModels(pb.ListModelsRequest())).models
            assert listed.inputs == added.inputs

    asyncio.run(scenario())


def test_the_console_says_why_in_one_line_and_exits_1(tmp_path: Path) -> None:
    model = tmp_path / "notes.onnx"
    model.write_text("not a model\n")

    async def scenario() -> subprocess.CompletedProcess[str]:
        async with running(tmp_path):
            argv = [sys.executable, "-m", "custodian.cli", "--data", str(tmp_path / "data"), "model", "add"]
            return await asyncio.to_thread(
                subprocess.run, [*argv, str(model)], capture_output=True, text=True, timeout=120, check=False
            )

    done = asyncio.run(scenario())
    assert done.returncode == 1
    assert done.stderr.startswith("custodian: model does not load in onnxruntime: ")
    assert done.stderr.count("\n") == 1
