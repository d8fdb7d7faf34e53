"""Domain errors to gRPC status codes: the one place this mapping lives.

Both an empty quota and a full generation queue are ``RESOURCE_EXHAUSTED``; the
trailing metadata ``custos-refusal`` tells them apart (``quota`` or ``busy``).
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from enclave._daemon.errors import (
    BusyError,
    CustodianOfflineError,
    GenerationsBusyError,
    InferenceError,
    InvalidInputError,
    LeaseRevokedError,
    ModelNotLoadedError,
    QuotaExhaustedError,
    SuspendedError,
)
from enclave.errors import EnclaveError

_CODES: tuple[tuple[type[EnclaveError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotLoadedError, grpc.StatusCode.FAILED_PRECONDITION),
    (SuspendedError, grpc.StatusCode.PERMISSION_DENIED),
    (LeaseRevokedError, grpc.StatusCode.PERMISSION_DENIED),
    (QuotaExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (GenerationsBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BusyError, grpc.StatusCode.UNAVAILABLE),
    (CustodianOfflineError, grpc.StatusCode.UNAVAILABLE),
    (InferenceError, grpc.StatusCode.INTERNAL),
)


def code_for(error: EnclaveError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


REFUSAL_KEY = "custos-refusal"


def _refusal(error: EnclaveError) -> tuple[tuple[str, str], ...]:
    if isinstance(error, GenerationsBusyError):
        return ((REFUSAL_KEY, "busy"),)
    if isinstance(error, QuotaExhaustedError):
        return ((REFUSAL_KEY, "quota"),)
    return ()


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: EnclaveError) -> NoReturn:
    """End the call with the error's status code and its one-line reason."""
    await context.abort(code_for(error), str(error), trailing_metadata=_refusal(error))
    raise AssertionError("grpc.aio ServicerContext.abort returned")
