"""Domain errors to gRPC status codes, per docs/protocol.md's table of enclave refusals."""

from __future__ import annotations

import grpc
import pytest

from enclave._daemon.errors import (
    CustodianOfflineError,
    InferenceError,
    InvalidInputError,
    LeaseRevokedError,
    ModelNotLoadedError,
    QuotaExhaustedError,
    SuspendedError,
)
from enclave._daemon.status import code_for
from enclave.errors import EnclaveError, EnvelopeError


@pytest.mark.parametrize(
    ("error", "code"),
    [
        pytest.param(InvalidInputError("not an image"), grpc.StatusCode.INVALID_ARGUMENT, id="invalid-input"),
        pytest.param(ModelNotLoadedError(), grpc.StatusCode.FAILED_PRECONDITION, id="no-model"),
        pytest.param(SuspendedError(), grpc.StatusCode.PERMISSION_DENIED, id="suspended"),
        pytest.param(LeaseRevokedError(), grpc.StatusCode.PERMISSION_DENIED, id="revoked"),
        pytest.param(QuotaExhaustedError(), grpc.StatusCode.RESOURCE_EXHAUSTED, id="exhausted"),
        pytest.param(CustodianOfflineError(), grpc.StatusCode.UNAVAILABLE, id="offline"),
        pytest.param(InferenceError("model failed"), grpc.StatusCode.INTERNAL, id="inference"),
        pytest.param(EnvelopeError(), grpc.StatusCode.INTERNAL, id="anything-else"),
    ],
)
def test_each_refusal_has_its_status_code(error: EnclaveError, code: grpc.StatusCode) -> None:
    assert code_for(error) == code


def test_offline_reason_is_the_documented_one() -> None:
    assert str(CustodianOfflineError()) == "custodian unreachable past the offline grace"
