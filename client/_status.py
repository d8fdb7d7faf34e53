"""gRPC status codes from the enclave -> client errors, in one place."""

from __future__ import annotations

import grpc

from client.errors import (
    ClientError,
    EnclaveBusyError,
    EnclaveUnavailableError,
    InvalidInputError,
    NotReadyError,
    QuotaExhaustedError,
    SuspendedError,
)

_ERRORS: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExhaustedError,
    grpc.StatusCode.PERMISSION_DENIED: SuspendedError,
    grpc.StatusCode.UNAVAILABLE: EnclaveUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: EnclaveUnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: NotReadyError,
}


# The enclave's trailing metadata that tells a full queue from an empty quota (both RESOURCE_EXHAUSTED).
_REFUSAL_KEY = "custos-refusal"


def from_rpc_error(error: grpc.RpcError) -> ClientError:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else None
    kind = _ERRORS.get(code, ClientError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _refusal(error) == "busy":
        kind = EnclaveBusyError
    return kind(f"enclave answered {code.name}: {details or 'no reason given'}")


def is_unavailable(error: grpc.RpcError) -> bool:
    """UNAVAILABLE: the enclave said so, or gRPC could not reach it (``Connection`` tells which)."""
    return isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAVAILABLE


def _refusal(error: grpc.RpcError) -> str:
    metadata: tuple[tuple[str, str | bytes], ...] = (
        tuple(error.trailing_metadata() or ()) if isinstance(error, grpc.Call) else ()
    )
    return next((str(value) for key, value in metadata if key == _REFUSAL_KEY), "")
