"""``Generate``: a language model's answer token by token, metered per token.

In order: the request is checked and tokenized in the bounded decoding pool (a
bad request costs nothing); the call waits for a generation slot
(``StreamSlots``: a few run at once, a bounded queue waits, the rest are
refused busy); it reserves the prompt plus ``max_tokens`` from the lease, or
what the lease can cover down to the prompt and one token; the model's
synchronous token iterator then runs one ``next`` at a time in the generation
executor. Before each token is sent the lease must still back every
reservation. The end settles the lease: the prompt (once the model started on
it) and the tokens produced count, the rest of the reservation is free again.
A cancelled stream stops computing at once and pays for what was produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace

from enclave._daemon.admission import BoundedPool, StreamSlots
from enclave._daemon.errors import CustodianOfflineError, InferenceError, SuspendedError
from enclave._daemon.lease import Lease
from enclave._daemon.metrics import DaemonMetrics
from enclave._daemon.prompting import Prompt, PromptLimits, prepare
from enclave._daemon.stop_strings import StopScanner
from enclave._daemon.text_models import LoadedTextModel
from enclave.receipts import TokenCounts
from protos import custos_pb2

logger = logging.getLogger(__name__)

_END = object()


@dataclass
class _Progress:
    """What one generation has cost so far."""

    prompt_tokens: int
    started: bool = False
    completion: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def charged(self) -> TokenCounts:
        # The prompt is charged once the model has started on it.
        return TokenCounts(self.prompt_tokens if self.started else 0, self.completion)


class Generation:
    def __init__(
        self,
        lease: Lease,
        metrics: DaemonMetrics,
        executor: Executor,
        *,
        slots: StreamSlots,
        preparing: BoundedPool,
        limits: PromptLimits,
    ) -> None:
        self._lease = lease
        self._metrics = metrics
        self._executor = executor
        self._slots = slots
        self._preparing = preparing
        self._limits = limits

    async def stream(
        self, model: LoadedTextModel, request: custos_pb2.GenerateRequest
    ) -> AsyncGenerator[custos_pb2.GenerateChunk, None]:
        arrived = time.perf_counter()
        prompt: Prompt = await self._preparing.run(prepare, model.model, request, self._limits)
        prompt_tokens = len(prompt.tokens)
        async with self._slots.slot():
            reserved = await self._lease.reserve(
                prompt_tokens + prompt.params.max_tokens, at_least=prompt_tokens + 1
            )
            progress = _Progress(prompt_tokens)
            finish = "cancelled"
            try:
                budget = reserved - prompt_tokens
                tokens = model.model.generate(prompt.tokens, replace(prompt.params, max_tokens=budget))
                finish = "error"
                async for chunk in self._run(model, prompt, tokens, budget, progress):
                    if chunk.WhichOneof("part") == "end":
                        finish = chunk.end.finish_reason
                        self._settle(reserved, progress)
                        reserved = 0
                        chunk.end.remaining_quota = self._lease.remaining + self._lease.deployment_balance
                    yield chunk
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                finish = "cancelled"
                raise
            finally:
                if reserved:
                    self._settle(reserved, progress)
                self._observe(finish, arrived, progress)

    async def _run(
        self,
        model: LoadedTextModel,
        prompt: Prompt,
        tokens: Iterator[int],
        budget: int,
        progress: _Progress,
    ) -> AsyncIterator[custos_pb2.GenerateChunk]:
        decoder = model.model.decoder()
        scanner = StopScanner(prompt.stops)
        unsent = 0
        pending: Future[object] | None = None
        try:
            while True:
                progress.started = True
                pending = self._executor.submit(_next_token, tokens)
                token = await asyncio.wrap_future(pending)
                pending = None
                if token is _END:
                    break
                if not self._lease.covers():
                    if self._lease.suspended:
                        raise SuspendedError()
                    if self._lease.closed or self._lease.offline:
                        raise CustodianOfflineError()
                    break  # the lease was cut under this stream: what it produced is sent, and no more
                assert isinstance(token, int)
                progress.completion += 1
                progress.last_token_at = time.perf_counter()
                progress.first_token_at = progress.first_token_at or progress.last_token_at
                unsent += 1
                text = scanner.push(decoder.push(token))
                if text:
                    yield self._delta(text, unsent)
                    unsent = 0
                if scanner.stopped:
                    yield self._end("stop", model, progress)
                    return
            tail = scanner.push(decoder.flush())
            tail += scanner.flush()
            if tail:
                yield self._delta(tail, unsent)
            if scanner.stopped:
                finish = "stop"
            elif token is not _END or progress.completion == budget < prompt.params.max_tokens:
                finish = "quota"  # cut short by the lease, not by the request
            else:
                finish = "stop" if progress.completion < budget else "length"
            yield self._end(finish, model, progress)
        finally:
            self._close(tokens, pending)

    def _close(self, tokens: Iterator[int], pending: Future[object] | None) -> None:
        """Stop the model's iterator (after the token it is computing, if any), in its own thread."""
        close = getattr(tokens, "close", None)
        if close is None:
            return

        def submit(_: object = None) -> None:
            with contextlib.suppress(RuntimeError):  # the executor is shut down: the daemon is stopping
                self._executor.submit(close)

        if pending is None:
            submit()
        else:
            pending.add_done_callback(submit)

    def _settle(self, reserved: int, progress: _Progress) -> None:
        charged = progress.charged
        self._lease.settle(reserved, charged)
        self._metrics.tokens.labels(kind="prompt").inc(charged.prompt)
        self._metrics.tokens.labels(kind="completion").inc(charged.completion)

    def _observe(self, finish: str, arrived: float, progress: _Progress) -> None:
        if finish in ("stop", "length", "quota", "cancelled"):
            self._metrics.generations.labels(finish_reason=finish).inc()
        first, last = progress.first_token_at, progress.last_token_at
        if first is not None:
            self._metrics.time_to_first_token.observe(first - arrived)
        if first is not None and last is not None and progress.completion > 1:
            self._metrics.time_per_output_token.observe((last - first) / (progress.completion - 1))

    @staticmethod
    def _delta(text: str, tokens: int) -> custos_pb2.GenerateChunk:
        return custos_pb2.GenerateChunk(delta=custos_pb2.GenerateDelta(text=text, tokens=tokens))

    @staticmethod
    def _end(finish: str, model: LoadedTextModel, progress: _Progress) -> custos_pb2.GenerateChunk:
        return custos_pb2.GenerateChunk(
            end=custos_pb2.GenerateEnd(
                prompt_tokens=progress.prompt_tokens,
                completion_tokens=progress.completion,
                finish_reason=finish,
                model_sha384=model.sha384_hex,
            )
        )


def _next_token(tokens: Iterator[int]) -> object:
    try:
        return next(tokens, _END)
    except Exception as exc:  # the model's own errors carry no stable type
        logger.warning("generation failed: %s", type(exc).__name__)
        raise InferenceError("the model failed while generating") from None
