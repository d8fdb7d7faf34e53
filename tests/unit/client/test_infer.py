"""A verified connection's calls: inputs checked before sending, enclave refusals mapped to errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client import Connection, connect, read_image
from client.api import MAX_INPUT_BYTES, MAX_TENSOR_BYTES
from client.errors import (
    ClientError,
    EnclaveUnavailableError,
    InvalidInputError,
    ModelChangedError,
    NotReadyError,
    QuotaExhaustedError,
    SuspendedError,
)
from testkit.processes import DIGITS_SAMPLES
from tests.unit.client.fake_enclave import FakeEnclave, serving
from tests.unit.enclave._sim_evidence import reference


@pytest.fixture
def conn(fake: FakeEnclave) -> Iterator[Connection]:
    with serving(fake) as address, connect(address, reference()) as connection:
        yield connection


STATUS_ERRORS = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidInputError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, QuotaExhaustedError),
    (grpc.StatusCode.PERMISSION_DENIED, SuspendedError),
    (grpc.StatusCode.UNAVAILABLE, EnclaveUnavailableError),
    (grpc.StatusCode.FAILED_PRECONDITION, NotReadyError),
    (grpc.StatusCode.INTERNAL, ClientError),
    (grpc.StatusCode.UNAUTHENTICATED, ClientError),
]


@pytest.mark.parametrize(("code", "error"), STATUS_ERRORS, ids=[code.name for code, _ in STATUS_ERRORS])
def test_enclave_status_maps_to_one_error_keeping_the_reason(
    fake: FakeEnclave, conn: Connection, code: grpc.StatusCode, error: type[ClientError]
) -> None:
    fake.infer_status = code
    fake.infer_details = "deployment acme is suspended"
    with pytest.raises(ClientError) as info:
        conn.infer_image(b"png")
    assert type(info.value) is error
    assert str(info.value) == f"enclave answered {code.name}: deployment acme is suspended"


def test_tensor_goes_as_little_endian_float32_with_its_shape(fake: FakeEnclave, conn: Connection) -> None:
    tensor = np.arange(64, dtype=np.float64).reshape(1, 1, 8, 8)
    result = conn.infer_tensor(tensor, top_k=1)
    assert [p.label for p in result.top] == ["three"]
    (request,) = fake.requests
    assert list(request.tensor.shape) == [1, 1, 8, 8]
    assert request.tensor.float32_data == tensor.astype("<f4").tobytes()
    assert request.WhichOneof("input") == "tensor"


def _big_tensor() -> Any:
    return np.zeros(MAX_TENSOR_BYTES // 4 + 1, dtype=np.float32)


INVALID_CALLS: list[tuple[str, Callable[[Connection], object], str]] = [
    ("empty-image", lambda c: c.infer_image(b""), "empty"),
    ("image-too-large", lambda c: c.infer_image(bytes(MAX_INPUT_BYTES + 1)), "limit"),
    ("top-k-zero", lambda c: c.infer_image(b"png", top_k=0), "top_k"),
    ("top-k-too-large", lambda c: c.infer_image(b"png", top_k=1001), "top_k"),
    ("top-k-not-int", lambda c: c.infer_image(b"png", top_k="3"), "top_k"),  # type: ignore[arg-type]
    ("tensor-of-text", lambda c: c.infer_tensor(np.array([["a"]])), "not a float32 tensor"),
    ("tensor-ragged", lambda c: c.infer_tensor([[1.0], [1.0, 2.0]]), "not a float32 tensor"),
    ("tensor-too-large", lambda c: c.infer_tensor(_big_tensor()), "limit"),
]


@pytest.mark.parametrize(
    ("call", "reason"), [pytest.param(call, reason, id=name) for name, call, reason in INVALID_CALLS]
)
def test_invalid_input_is_refused_before_sending(
    fake: FakeEnclave, conn: Connection, call: Callable[[Connection], object], reason: str
) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        call(conn)
    assert fake.requests == []


def test_an_answer_from_another_model_than_attested_is_refused(fake: FakeEnclave, conn: Connection) -> None:
    fake.model_sha384 = "ab" * 48
    with pytest.raises(ModelChangedError, match="connect again"):
        conn.infer_image(b"png")


def test_status_is_the_enclaves_account(fake: FakeEnclave, conn: Connection) -> None:
    conn.infer_image(b"png")
    status = conn.status()
    assert status.deployment == "demo"
    assert status.served == 1


# ------------------------------------------------------------------------ read_image


def test_read_image_reads_a_sample() -> None:
    sample = DIGITS_SAMPLES / "digit-7.jpg"
    assert read_image(sample) == sample.read_bytes()


def _sparse(tmp_path: Path) -> Path:
    path = tmp_path / "huge.png"
    with path.open("wb") as file:
        file.truncate(MAX_INPUT_BYTES + 1)
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.png"
    path.touch()
    return path


INPUT_FILES = [
    ("missing", lambda tmp: tmp / "absent.png", "cannot read"),
    ("directory", lambda tmp: tmp, "cannot read|not a regular file"),
    ("empty", _empty, "empty"),
    ("too-large", _sparse, "limit"),
    ("device", lambda tmp: Path(os.devnull), "not a regular file"),
]


@pytest.mark.parametrize(
    ("make", "reason"), [pytest.param(make, reason, id=name) for name, make, reason in INPUT_FILES]
)
def test_read_image_refuses(tmp_path: Path, make: Callable[[Path], Path], reason: str) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        read_image(make(tmp_path))
