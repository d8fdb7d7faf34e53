"""The one place where domain errors become gRPC status codes (see DESIGN.md, Interfaces).

``StatusInterceptor`` wraps every handler of a server: a ``CustodianError`` or
``EnclaveError`` raised by a handler ends the call with the matching status and
the error's one-line reason; anything else is logged with its traceback and
answered ``INTERNAL`` without details. Every call is counted by method and code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio

from custodian.errors import (
    BusyError,
    ConflictError,
    CustodianError,
    InvalidRequestError,
    LedgerUnavailableError,
    NotFoundError,
    RefusedError,
    SuspendedError,
)
from custodian.metrics import CustodianMetrics
from enclave.collateral._http import CollateralServiceError
from enclave.errors import AttestationError, EnclaveError, FormatError, ManifestError

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (FormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (ManifestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (RefusedError, grpc.StatusCode.PERMISSION_DENIED),
    (AttestationError, grpc.StatusCode.PERMISSION_DENIED),
    (BusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CollateralServiceError, grpc.StatusCode.UNAVAILABLE),
    (LedgerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (SuspendedError, grpc.StatusCode.FAILED_PRECONDITION),
)


# Longest details a status carries (and the log repeats): a caller's input in an error's text
# must not make every reply and log line as large as the message it sent.
MAX_DETAILS = 512


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and details a failed call answers with."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, _cut(str(exc))
    if isinstance(exc, (CustodianError, EnclaveError)):
        return grpc.StatusCode.INTERNAL, _cut(str(exc))
    return grpc.StatusCode.INTERNAL, "internal error"


def _cut(details: str) -> str:
    return details if len(details) <= MAX_DETAILS else details[:MAX_DETAILS] + "..."


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, metrics: CustodianMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        serde = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), **serde)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(method, handler.stream_unary), **serde)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(method, handler.unary_stream), **serde)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._stream(method, handler.stream_stream), **serde)
        return handler

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            with self._metrics.rpc_seconds.labels(method).time():
                return await self._unary_call(method, behaviour, request, context)

        return call

    async def _unary_call(
        self, method: str, behaviour: Callable[..., Any], request: Any, context: Context
    ) -> Any:
        try:
            response = await behaviour(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            self._count(method, "CANCELLED")
            raise
        except Exception as exc:
            await self._fail(method, exc, context)
        self._count(method, "OK")
        return response

    def _stream(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            with self._metrics.rpc_seconds.labels(method).time():
                async for message in self._stream_call(method, behaviour, request, context):
                    yield message

        return call

    async def _stream_call(
        self, method: str, behaviour: Callable[..., Any], request: Any, context: Context
    ) -> AsyncIterator[Any]:
        try:
            async for message in behaviour(request, context):
                yield message
        except (grpc.aio.AbortError, asyncio.CancelledError):
            self._count(method, "CANCELLED")
            raise
        except Exception as exc:
            await self._fail(method, exc, context)
        self._count(method, "OK")

    async def _fail(self, method: str, exc: Exception, context: Context) -> NoReturn:
        code, details = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("%s failed", method, exc_info=exc)
        else:
            logger.info("%s refused: %s %s", method, code.name, details)
        self._count(method, code.name)
        await context.abort(code, details)

    def _count(self, method: str, code: str) -> None:
        self._metrics.requests.labels(method, code).inc()
