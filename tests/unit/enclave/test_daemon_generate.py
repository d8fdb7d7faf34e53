"""Generate end to end in process: fake custodian, attested TLS, the echo double as the model,
metered per token (prompt and completion), exact under concurrency and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from enclave._daemon.daemon import Daemon, Ready
from enclave._daemon.status import REFUSAL_KEY
from enclave._daemon.text_models import TextModelLoader
from enclave.attestation.sim import SimAttester
from enclave.identity import ENCLAVE_TLS_NAME
from protos import custos_pb2, custos_pb2_grpc
from tests.llm_double import EchoModel, loader, payload
from tests.unit.enclave.fake_custodian import FakeCustodian, FakeGateway
from tests.unit.enclave.test_daemon_link import eventually, make_config
from tests.unit.enclave.test_daemon_service import expect_code

Chunks = list[custos_pb2.GenerateChunk]


class Running:
    def __init__(self, gateway: FakeGateway, daemon: Daemon, model: EchoModel, ready: Ready) -> None:
        self.gateway, self.daemon, self.model, self.ready = gateway, daemon, model, ready
        self.stub: custos_pb2_grpc.InferenceAsyncStub

    async def generate(self, **fields: object) -> Chunks:
        return [chunk async for chunk in self.stub.Generate(custos_pb2.GenerateRequest(**fields))]  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    gateway: FakeGateway, model: EchoModel | None = None, **overrides: object
) -> AsyncIterator[Running]:
    model = model or EchoModel()
    async with FakeCustodian(gateway) as custodian:
        ready: asyncio.Future[Ready] = asyncio.get_running_loop().create_future()
        daemon = Daemon(
            make_config(gateway, custodian.address, **overrides),
            SimAttester(),
            on_ready=ready.set_result,
            text_models=loader(model),
        )
        task = asyncio.ensure_future(daemon.run())
        done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        run = Running(gateway, daemon, model, ready.result())
        host, port = run.ready.inference.rsplit(":", 1)
        pem = (await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)))).encode()
        channel = grpc.aio.secure_channel(
            run.ready.inference,
            grpc.ssl_channel_credentials(root_certificates=pem),
            options=[("grpc.ssl_target_name_override", ENCLAVE_TLS_NAME)],
        )
        run.stub = custos_pb2_grpc.InferenceStub(channel)
        try:
            yield run
        finally:
            await channel.close(None)
            daemon.request_stop()
            await task


async def read_to_end(call: Any) -> Chunks:
    chunks: Chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    return chunks


def text_of(chunks: Chunks) -> str:
    return "".join(c.delta.text for c in chunks if c.WhichOneof("part") == "delta")


def end_of(chunks: Chunks) -> custos_pb2.GenerateEnd:
    assert chunks[-1].WhichOneof("part") == "end"
    return chunks[-1].end


def chat(*turns: tuple[str, bytes]) -> custos_pb2.ChatMessages:
    return custos_pb2.ChatMessages(messages=[custos_pb2.ChatMessage(role=r, content=c) for r, c in turns])


def test_streams_the_answer_and_charges_prompt_and_completion_tokens() -> None:
    gateway = FakeGateway(model=payload(), balance=1000, lease_size=200)

    async def run() -> None:
        async with running(gateway) as r:
            chunks = await r.generate(prompt="héllo wörld".encode(), max_tokens=40)
            assert text_of(chunks) == "héllo wörld"
            end = end_of(chunks)
            prompt_tokens = 1 + len("héllo wörld".encode())  # BOS and the bytes
            assert (end.prompt_tokens, end.completion_tokens) == (prompt_tokens, prompt_tokens - 1)
            assert end.finish_reason == "stop"
            assert end.model_sha384 == gateway.sha384.hex()
            assert sum(c.delta.tokens for c in chunks[:-1]) == end.completion_tokens
            # No delta splits a UTF-8 sequence: each is valid text on its own.
            assert all(c.delta.text for c in chunks[:-1])
            lease = r.daemon.lease
            assert (lease.committed, lease.reserved) == (2 * prompt_tokens - 1, 0)
            assert lease.tokens is not None
            assert (lease.tokens.prompt, lease.tokens.completion) == (prompt_tokens, prompt_tokens - 1)
            assert end.remaining_quota == lease.remaining + lease.deployment_balance

            chunks = await r.generate(chat=chat(("system", b"be brief"), ("user", b"hi")), max_tokens=4)
            assert text_of(chunks) == "[sys"
            assert end_of(chunks).finish_reason == "length"

            with expect_code(grpc.StatusCode.INVALID_ARGUMENT, "call Generate, not Infer"):
                await r.stub.Infer(custos_pb2.InferRequest(image=b"\x89PNG"))
            scraped = r.daemon.metrics.registry.get_sample_value
            chat_tokens = len("[system]be brief\n[user]hi\n") + 1
            assert scraped("custos_enclave_tokens_total", {"kind": "prompt"}) == prompt_tokens + chat_tokens
            assert scraped("custos_enclave_generations_total", {"finish_reason": "length"}) == 1
            assert scraped("custos_enclave_time_to_first_token_seconds_count") == 2
            assert scraped("custos_enclave_active_streams") == 0
        final = gateway.reports[-1]
        assert final.final
        chat_tokens = len("[system]be brief\n[user]hi\n") + 1
        assert (final.prompt_tokens, final.completion_tokens) == (
            prompt_tokens + chat_tokens,
            prompt_tokens - 1 + 4,
        )
        assert final.used == final.prompt_tokens + final.completion_tokens
        receipt = gateway.receipts[-1]
        assert receipt.tokens is not None
        assert (receipt.tokens.prompt, receipt.tokens.completion) == (
            final.prompt_tokens,
            final.completion_tokens,
        )

    asyncio.run(run())


def test_a_stop_string_ends_the_answer_before_it_and_is_not_sent() -> None:
    gateway = FakeGateway(model=payload(), balance=1000, lease_size=200)

    async def run() -> None:
        async with running(gateway) as r:
            chunks = await r.generate(prompt=b"one, two; three", stop=[b"; t", b"zzz"])
            assert text_of(chunks) == "one, two"
            end = end_of(chunks)
            assert end.finish_reason == "stop"
            # The tokens of the stop string were produced, and are charged.
            assert end.completion_tokens == len(b"one, two; t")
            assert r.model.params_seen[-1].max_tokens == 64 - 16  # max_tokens 0: to the end of the context

    asyncio.run(run())


BAD_REQUESTS = [
    pytest.param({}, "request carries no prompt", id="no-input"),
    pytest.param({"prompt": b""}, "prompt is empty", id="empty-prompt"),
    pytest.param({"prompt": b"\xff\xfeabc"}, "not valid UTF-8", id="invalid-utf8"),
    pytest.param({"prompt": b"x" * 63}, "prompt is 64 tokens, the model's context 64", id="over-long"),
    pytest.param({"prompt": b"hello", "max_tokens": 59}, "max_tokens must be 1 to 58", id="max-tokens"),
    # Longer than context x the longest token's bytes: refused on its size, before the tokenizer runs.
    pytest.param({"prompt": b"x" * 65}, "more than the model's context can hold", id="over-long-bytes"),
    pytest.param(
        {"chat": chat(("user", b"x" * 65))}, "more than the model's context can hold", id="over-long-chat"
    ),
    pytest.param({"chat": chat()}, "the chat has no messages", id="no-messages"),
    pytest.param({"chat": chat(("robot", b"hi"))}, "unknown role 'robot'", id="unknown-role"),
    pytest.param(
        {"chat": chat(("user", b"\xc3("))}, "message 1's content is not valid UTF-8", id="bad-content"
    ),
    pytest.param({"chat": chat(("user", b""))}, "every message is empty", id="empty-chat"),
    pytest.param({"prompt": b"hi", "temperature": 2.5}, "temperature must be 0 to 2", id="temperature"),
    pytest.param({"prompt": b"hi", "top_p": 0.0}, "top_p must be above 0", id="top-p"),
    pytest.param({"prompt": b"hi", "top_k": 1001}, "top_k must be 0", id="top-k"),
    pytest.param({"prompt": b"hi", "stop": [b"a"] * 5}, "at most 4 stop strings", id="stops"),
    pytest.param({"prompt": b"hi", "stop": [b"\xff"]}, "a stop string is not valid UTF-8", id="stop-utf8"),
]


def test_bad_input_is_refused_with_its_reason_and_costs_nothing() -> None:
    gateway = FakeGateway(model=payload(), balance=1000, lease_size=200)

    async def run() -> None:
        async with running(gateway) as r:
            for param in BAD_REQUESTS:
                fields, reason = param.values
                with expect_code(grpc.StatusCode.INVALID_ARGUMENT, str(reason)):
                    await r.generate(**fields)  # type: ignore[arg-type]
                assert (r.daemon.lease.committed, r.daemon.lease.reserved) == (0, 0), param.id
            assert r.model.computed == 0
        assert gateway.reports[-1].used == 0

    asyncio.run(run())


def test_a_lease_that_cannot_cover_the_request_generates_what_it_can_and_ends_with_quota() -> None:
    gateway = FakeGateway(model=payload(), balance=10, lease_size=10)

    async def run() -> None:
        async with running(gateway) as r:
            chunks = await r.generate(prompt=b"abcdefgh", max_tokens=8)  # 9 prompt tokens
            assert text_of(chunks) == "a"
            end = end_of(chunks)
            assert (end.prompt_tokens, end.completion_tokens, end.finish_reason) == (9, 1, "quota")
            assert end.remaining_quota == 0
            with expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "no tokens left in the lease"):
                await r.generate(prompt=b"a", max_tokens=1)
            assert r.daemon.lease.committed == 10

    asyncio.run(run())


def test_concurrent_streams_never_produce_more_tokens_than_granted() -> None:
    granted = 150
    gateway = FakeGateway(model=payload(), balance=granted, lease_size=60)

    async def run() -> None:
        async with running(gateway, generation_streams=3, generation_waiting=64) as r:

            async def one(i: int) -> tuple[int, int]:
                try:
                    chunks = await r.generate(prompt=f"stream {i:02d} asks".encode(), max_tokens=15)
                except grpc.aio.AioRpcError as exc:
                    refused.append(exc.code())
                    return 0, 0
                end = end_of(chunks)
                assert len(text_of(chunks).encode()) == end.completion_tokens
                return end.prompt_tokens, end.completion_tokens

            refused: list[grpc.StatusCode] = []
            results = await asyncio.gather(*(one(i) for i in range(20)))
            assert set(refused) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
            charged = sum(p + c for p, c in results)
            assert 0 < charged <= granted
            await eventually(lambda: r.daemon.lease.reserved == 0, "reservations settled")
            assert r.model.most_running <= 3
        reported = sum(report.used for report in gateway.reports if report.final)
        assert reported == charged
        assert gateway.balance + charged == granted

    asyncio.run(run())


def test_a_cancelled_stream_stops_computing_and_pays_for_what_was_produced() -> None:
    gateway = FakeGateway(model=payload(), balance=1000, lease_size=200)
    model = EchoModel(pace=threading.Semaphore(0))

    async def run() -> None:
        async with running(gateway, model) as r:
            call = r.stub.Generate(custos_pb2.GenerateRequest(prompt=b"abcdefghij", max_tokens=10))
            model.pace.release(3)  # type: ignore[union-attr]
            seen = ""
            async for chunk in call:
                seen += chunk.delta.text
                if len(seen) == 3:
                    break
            call.cancel()
            await eventually(lambda: r.daemon.lease.reserved == 0, "the cancelled stream settled")
            model.pace.release(100)  # type: ignore[union-attr]
            await eventually(lambda: model.running == 0, "the model's iterator closed")
            assert model.computed <= 4  # at most the token being computed when the call was cancelled
            assert r.daemon.lease.committed == 11 + 3
            counted = r.daemon.metrics.registry.get_sample_value
            await eventually(
                lambda: counted("custos_enclave_generations_total", {"finish_reason": "cancelled"}) == 1,
                "counted as cancelled",
            )

    asyncio.run(run())


def test_past_the_queue_a_generation_is_refused_busy() -> None:
    gateway = FakeGateway(model=payload(), balance=1000, lease_size=200)
    model = EchoModel(pace=threading.Semaphore(0))

    async def run() -> None:
        async with running(gateway, model, generation_streams=1, generation_waiting=1) as r:
            first = r.stub.Generate(custos_pb2.GenerateRequest(prompt=b"ab", max_tokens=2))
            second = r.stub.Generate(custos_pb2.GenerateRequest(prompt=b"cd", max_tokens=2))
            await eventually(lambda: model.running == 1, "the first runs")
            await eventually(
                lambda: r.daemon.metrics.registry.get_sample_value("custos_enclave_queued_streams") == 1,
                "the second waits",
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await r.generate(prompt=b"ef", max_tokens=2)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "enclave is busy" in (refused.value.details() or "")
            assert (REFUSAL_KEY, "busy") in tuple(refused.value.trailing_metadata() or ())
            model.pace.release(4)  # type: ignore[union-attr]
            assert text_of([c async for c in first]) == "ab"
            assert text_of([c async for c in second]) == "cd"
            assert r.daemon.lease.committed == 3 + 2 + 3 + 2

    asyncio.run(run())


@pytest.mark.parametrize("cut", ["revoke", "suspend"])
def test_a_lease_cut_mid_stream_stops_it_and_charges_what_was_sent(cut: str) -> None:
    gateway = FakeGateway(model=payload(), balance=1000, lease_size=200)
    model = EchoModel(pace=threading.Semaphore(0))

    async def run() -> None:
        async with running(gateway, model) as r:
            assert model.pace is not None
            call = r.stub.Generate(custos_pb2.GenerateRequest(prompt=b"abcdefgh", max_tokens=8))
            model.pace.release(2)
            received: Chunks = []
            received.append(await call.read())  # type: ignore[arg-type]
            received.append(await call.read())  # type: ignore[arg-type]
            if cut == "revoke":
                gateway.revoke_all()
            else:
                gateway.set_suspended(True)
            await eventually(lambda: not r.daemon.lease.covers(), "the cut reached the enclave")
            model.pace.release(10)
            if cut == "revoke":
                rest = await read_to_end(call)
                assert text_of(received + rest) == "ab"
                assert end_of(rest).finish_reason == "quota"
            else:
                with expect_code(grpc.StatusCode.PERMISSION_DENIED, "suspended"):
                    await read_to_end(call)
            await eventually(lambda: r.daemon.lease.reserved == 0, "settled")
            assert r.daemon.lease.committed == 9 + 2  # the prompt and the two tokens sent

    asyncio.run(run())


def test_the_language_model_is_closed_when_the_daemon_stops() -> None:
    model = EchoModel()
    gateway = FakeGateway(model=payload(), balance=100, lease_size=50)

    async def run() -> None:
        async with running(gateway, model) as r:
            await r.generate(prompt=b"hi", max_tokens=4)
            assert not model.closed
        assert model.closed

    asyncio.run(run())


def test_a_zeroize_closes_the_language_model() -> None:
    model = EchoModel()
    gateway = FakeGateway(model=payload(), balance=100, lease_size=50, grace=1)

    async def run() -> None:
        async with running(gateway, model) as r:
            gateway.set_suspended(True)
            await eventually(lambda: model.closed, "zeroized", limit=15)
            assert r.daemon.service.text_model is None

    asyncio.run(run())


def test_a_language_model_whose_load_outlives_a_stop_is_closed_all_the_same() -> None:
    model, loading, release = EchoModel(), threading.Event(), threading.Event()
    double = loader(model)

    def slow_load(data: bytearray, threads: int) -> Any:
        loading.set()
        release.wait(10)
        return double.load(data, threads)

    gateway = FakeGateway(model=payload(), balance=100, lease_size=50)

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            daemon = Daemon(
                make_config(gateway, custodian.address),
                SimAttester(),
                text_models=TextModelLoader(double.recognises, slow_load),
            )
            task = asyncio.ensure_future(daemon.run())
            await eventually(loading.is_set, "loading")
            daemon.request_stop()
            await task  # the daemon is done; its load thread is not
            release.set()
            await eventually(lambda: model.closed, "closed after the load")

    asyncio.run(run())
