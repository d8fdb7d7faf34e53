"""Issue 13 item 5: what one enrolled instance may make the custodian do is bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from custodian.gateway import FETCH_BURST, MAX_STREAMS_PER_INSTANCE
from protos import custos_pb2 as pb
from tests.integration.custodian.harness import onnx_model, running


def _counted(r: Any, name: str, **labels: str) -> float:
    return r.server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_fetch_model_is_rate_limited_per_instance(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            token = await r.lend("d", model=onnx_model(10_000))
            _, _, gateway = await r.enrol("d", token)
            _, _, other = await r.enrol("d", token)
            for _ in range(FETCH_BURST):
                assert len([p async for p in gateway.FetchModel(pb.FetchModelRequest())]) > 1
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [p async for p in gateway.FetchModel(pb.FetchModelRequest())]
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Nothing was pushed for the refused call; another instance is not held back.
            assert _counted(r, "custos_custodian_model_pushes_total") == FETCH_BURST
            assert len([p async for p in other.FetchModel(pb.FetchModelRequest())]) > 1

    asyncio.run(scenario())


async def _code(attempt: Any) -> grpc.StatusCode | None:
    try:
        await attempt
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return None


@pytest.mark.parametrize("method", ["Watch", "ReportStream"])
def test_an_instance_holds_only_a_few_streams_open(tmp_path: Path, method: str) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            token = await r.lend("d")
            _, _, gateway = await r.enrol("d", token)
            _, _, other = await r.enrol("d", token)

            def open_stream(stub: Any) -> Any:
                if method == "Watch":
                    return stub.Watch(pb.WatchRequest())
                return stub.ReportStream(None)

            async def opened(call: Any) -> None:
                if method == "Watch":
                    assert isinstance(await call.read(), pb.ControlEvent)  # the first heartbeat
                else:
                    await call.write(pb.UsageReport())  # refused in-band: the stream is open
                    assert (await call.read()).HasField("refusal")

            held = [open_stream(gateway) for _ in range(MAX_STREAMS_PER_INSTANCE)]
            for call in held:
                await opened(call)
            extra = open_stream(gateway)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await opened(extra)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Another instance is not held back, and a closed stream frees its slot.
            await opened(open_stream(other))
            held[0].cancel()
            for _ in range(200):  # the server notices the cancellation a moment later
                code = await _code(opened(open_stream(gateway)))
                if code is None:
                    break
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("a cancelled stream never freed its slot")
            for call in held[1:]:
                call.cancel()

    asyncio.run(scenario())
