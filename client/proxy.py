"""custos-proxy's HTTP side: OpenAI's chat completions API in front of one verified enclave.

``POST /v1/chat/completions`` (with and without ``stream``, server-sent events,
``stream_options.include_usage``) and ``GET /v1/models``. Every request goes over
the ``PinnedEnclave``'s connection: verified before the first request, pinned,
verified again after it was lost; when verification fails the answer is 503
with the reason, and nothing is sent to the enclave. Errors have OpenAI's shape
and status: 400 bad input, 429 quota exhausted (``insufficient_quota``) or the
enclave busy, 403 suspended, 503 verification or the enclave unavailable.

The client API is blocking: each call to it runs in a worker thread. The first
delta of an answer is awaited before the response starts, so that a refusal
still gets its own status; a client that goes away, streaming or not, cancels
the answer, and the enclave charges only what it produced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from client.api import Connection
from client.errors import (
    ClientError,
    EnclaveBusyError,
    EnclaveChangedError,
    EnclaveUnavailableError,
    InvalidInputError,
    ModelChangedError,
    NotReadyError,
    QuotaExhaustedError,
    SuspendedError,
    VerificationRefusedError,
)
from client.generation import Delta, Generation
from client.openai_schema import (
    MAX_BODY_BYTES,
    ChatRequest,
    Completion,
    error_doc,
    parse_chat_request,
    sse,
)
from client.pinned_enclave import PinnedEnclave

logger = logging.getLogger(__name__)

# ClientError -> HTTP status, OpenAI error type, code; the first match wins.
_STATUSES: tuple[tuple[type[ClientError], int, str, str | None], ...] = (
    (InvalidInputError, 400, "invalid_request_error", None),
    (QuotaExhaustedError, 429, "insufficient_quota", "insufficient_quota"),
    (EnclaveBusyError, 429, "rate_limit_exceeded", "enclave_busy"),
    (SuspendedError, 403, "permission_denied", "deployment_suspended"),
    (VerificationRefusedError, 503, "verification_refused", "verification_refused"),
    (EnclaveUnavailableError, 503, "enclave_unavailable", "enclave_unavailable"),
    (NotReadyError, 503, "enclave_unavailable", "model_not_loaded"),
    (ModelChangedError, 503, "verification_refused", "model_changed"),
)


def error_body(error: ClientError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped body for a client error."""
    status, kind, code = next(
        ((s, k, c) for t, s, k, c in _STATUSES if isinstance(error, t)), (502, "api_error", None)
    )
    message = str(error)
    if isinstance(error, VerificationRefusedError):
        message = f"enclave verification refused, nothing was sent: {message}"
    return status, error_doc(message, kind, code)


def error_response(error: ClientError) -> JSONResponse:
    status, body = error_body(error)
    return JSONResponse(body, status_code=status)


class Proxy:
    def __init__(self, enclave: PinnedEnclave) -> None:
        self._enclave = enclave

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        try:
            connection = await asyncio.to_thread(self._enclave.connection)
        except ClientError as exc:
            return error_response(exc)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": connection.deployment,
                        "object": "model",
                        "created": 0,
                        "owned_by": "custos",
                        "custos_model_sha384": connection.model_sha384,
                    }
                ],
            }
        )

    async def chat_completions(self, request: Request) -> Response:
        try:
            chat = parse_chat_request(await _body(request))
            connection, answer, first = await asyncio.to_thread(self._start, chat)
        except ClientError as exc:
            return error_response(exc)
        completion = Completion(connection.deployment)
        if chat.stream:
            return StreamingResponse(
                self._events(chat, completion, answer, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        drained = asyncio.ensure_future(asyncio.to_thread(_drain, answer))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({drained, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not drained.done():  # the client went away: the enclave stops, charging what it produced
                answer.cancel()
                await drained
                return Response(status_code=499)  # nobody reads it; uvicorn drops it
            await drained
        except ClientError as exc:
            return error_response(exc)
        finally:
            gone.cancel()
            answer.cancel()  # a no-op once it has ended
        assert answer.usage is not None
        return JSONResponse(completion.response(answer.text, answer.usage))

    def _start(self, chat: ChatRequest) -> tuple[Connection, Generation, Delta | None]:
        """The answer started, with its first delta (None: it has none); verified again if need be."""
        for attempt in (1, 2):
            connection = self._enclave.connection()
            answer = connection.generate(
                messages=chat.messages,
                max_tokens=chat.max_tokens,
                temperature=chat.temperature,
                top_p=chat.top_p,
                top_k=chat.top_k,
                seed=chat.seed,
                stop=chat.stop,
            )
            try:
                return connection, answer, next(answer, None)
            except ClientError as exc:
                answer.cancel()
                dropped = self._enclave.failed(connection, exc)
                # Another certificate at the enclave's address: nothing was sent over it, so the
                # request may go again, once the enclave there has been verified.
                if not (dropped and isinstance(exc, EnclaveChangedError) and attempt == 1):
                    raise
        raise AssertionError("unreachable")

    async def _events(
        self, chat: ChatRequest, completion: Completion, answer: Generation, first: Delta | None
    ) -> AsyncIterator[bytes]:
        usage_field = chat.include_usage
        try:
            yield sse(completion.chunk({"role": "assistant", "content": ""}, include_usage=usage_field))
            delta = first
            while delta is not None:
                if delta.text:
                    yield sse(completion.chunk({"content": delta.text}, include_usage=usage_field))
                delta = await asyncio.to_thread(next, answer, None)
            assert answer.usage is not None
            yield sse(completion.chunk({}, usage=answer.usage, include_usage=usage_field))
            if usage_field:
                yield sse(completion.usage_chunk(answer.usage))
            yield sse("[DONE]")
        except ClientError as exc:
            # The status line went out with the first chunk: the error travels as an event.
            logger.warning("answer failed mid-stream: %s", exc)
            yield sse(error_body(exc)[1])
        finally:
            answer.cancel()  # the client went away, or the answer ended: a no-op then


async def _disconnected(request: Request) -> None:
    """Returns once the HTTP client has gone away (the body was read: nothing else arrives before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _drain(answer: Generation) -> None:
    for _ in answer:
        pass


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise InvalidInputError(f"the request body is over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise InvalidInputError(f"the request body is over {MAX_BODY_BYTES} bytes")
    return bytes(body)
