"""Domain errors become gRPC status codes in one place."""

from __future__ import annotations

import grpc
import pytest

from custodian._status import status_of
from custodian.errors import (
    BusyError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    LedgerError,
    NotFoundError,
    RefusedError,
)
from enclave.errors import BindingError, EnvelopeError, EvidenceError, FormatError, ManifestError, PolicyError


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (FormatError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ManifestError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("bad"), grpc.StatusCode.NOT_FOUND),
        (ConflictError("bad"), grpc.StatusCode.ALREADY_EXISTS),
        (RefusedError("bad"), grpc.StatusCode.PERMISSION_DENIED),
        (EvidenceError("bad"), grpc.StatusCode.PERMISSION_DENIED),
        (BindingError("bad"), grpc.StatusCode.PERMISSION_DENIED),
        (PolicyError(["bad"]), grpc.StatusCode.PERMISSION_DENIED),
        (BusyError("bad"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (LedgerError("bad"), grpc.StatusCode.INTERNAL),
        (ConfigError("bad"), grpc.StatusCode.INTERNAL),
        (EnvelopeError(), grpc.StatusCode.INTERNAL),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_domain_errors_keep_their_reason(error: Exception, code: grpc.StatusCode) -> None:
    assert status_of(error) == (code, str(error))


def test_anything_else_is_internal_without_details() -> None:
    assert status_of(KeyError("secret detail")) == (grpc.StatusCode.INTERNAL, "internal error")


@pytest.mark.parametrize(
    "error", [RefusedError("x" * 1_000_000), FormatError("y" * 1_000_000)], ids=["refused", "format"]
)
def test_details_are_cut_short_whatever_a_caller_put_in_the_error(error: Exception) -> None:
    """Issue 13 item 3: a caller's megabyte came back in the reply and went into the log."""
    _, details = status_of(error)
    assert len(details) <= 520
    assert details.startswith(str(error)[:100])
