"""What the client says when the enclave it verified goes away or is replaced (issue 13, items 17-18).

A relay on loopback sends each connection where the test says: the first
handshake (certificate read and appraised) to one enclave, the pinned channel
to another, or to nothing at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import connect
from client.errors import (
    EnclaveChangedError,
    EnclaveNotListeningError,
    EnclaveUnavailableError,
    VerificationRefusedError,
)
from testkit.processes import DIGITS_SAMPLES
from tests.unit.client.fake_enclave import FakeEnclave, serving
from tests.unit.client.switchboard import switchboard
from tests.unit.enclave._sim_evidence import reference

REPO = Path(__file__).resolve().parents[3]
IMAGE = DIGITS_SAMPLES / "digit-3.png"


@pytest.fixture
def impostor() -> FakeEnclave:
    """An honest enclave of its own, with another key: a re-enrolled instance, or an attacker's."""
    return FakeEnclave()


@pytest.fixture
def impostor_address(impostor: FakeEnclave) -> Iterator[str]:
    with serving(impostor) as address:
        yield address


def test_another_certificate_on_the_pinned_channel_is_refused_before_anything_is_sent(
    fake: FakeEnclave, address: str, impostor: FakeEnclave, impostor_address: str
) -> None:
    with switchboard(address, impostor_address) as board, pytest.raises(VerificationRefusedError) as info:
        connect(board.address, reference(), timeout=10)
    assert "now presents another certificate than the one verified" in str(info.value)
    assert "nothing was sent" in str(info.value)
    assert (fake.nonces, impostor.nonces, fake.requests, impostor.requests) == ([], [], [], [])


def test_an_enclave_gone_after_the_first_handshake_is_not_listening(fake: FakeEnclave, address: str) -> None:
    with switchboard(address, None) as board, pytest.raises(EnclaveNotListeningError) as info:
        connect(board.address, reference(), timeout=10)
    assert str(info.value).startswith(f"nothing is listening at {board.address} (connection refused)")
    assert fake.nonces == []


def test_a_connection_whose_enclave_is_replaced_says_so_and_sends_nothing(
    fake: FakeEnclave, address: str, impostor: FakeEnclave, impostor_address: str
) -> None:
    with switchboard(address) as board, connect(board.address, reference(), timeout=10) as conn:
        conn.infer_image(IMAGE.read_bytes())
        board.routes = [impostor_address]
        board.cut()
        with pytest.raises(EnclaveChangedError, match="connect again to verify it"):
            conn.infer_image(IMAGE.read_bytes())
    assert isinstance(EnclaveChangedError("x"), EnclaveUnavailableError)
    assert len(fake.requests) == 1
    assert impostor.requests == []


def test_the_enclaves_own_unavailable_keeps_its_reason(fake: FakeEnclave, address: str) -> None:
    fake.infer_status, fake.infer_details = (
        grpc.StatusCode.UNAVAILABLE,
        "custodian unreachable past the grace",
    )
    with connect(address, reference(), timeout=10) as conn, pytest.raises(EnclaveUnavailableError) as info:
        conn.infer_image(IMAGE.read_bytes())
    assert type(info.value) is EnclaveUnavailableError
    assert str(info.value) == "enclave answered UNAVAILABLE: custodian unreachable past the grace"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_custos_query_says_it_in_one_line_without_grpc_log_lines(
    address: str, impostor_address: str, tmp_path: Path, as_json: bool
) -> None:
    """A real custos-query process: its stderr carries our line alone, none of gRPC's C core."""
    manifest = tmp_path / "end-user.toml"
    manifest.write_text(reference().to_toml())
    with switchboard(address, impostor_address) as board:
        done = subprocess.run(
            [sys.executable, "-m", "client.cli", "--enclave", board.address, "--manifest", str(manifest)]
            + (["--json"] if as_json else [])
            + ["--timeout", "20", str(IMAGE)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        )
    assert done.returncode == 3, done.stderr
    if as_json:
        assert done.stderr == ""
        assert "now presents another certificate" in json.loads(done.stdout)["reason"]
    else:
        (line,) = done.stderr.splitlines()
        assert line.startswith("custos-query: verification refused, nothing was sent: the enclave at")
