"""custos-query: output, exit codes and misuse, against the fake enclave on loopback TLS."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from client.api import MAX_TOP_K
from client.cli import _parser, main
from enclave.attestation.sim import SIMULATION_WARNING
from testkit.processes import DIGITS_SAMPLES
from tests.unit.client.fake_enclave import FakeEnclave, serving
from tests.unit.enclave._sim_evidence import MODEL_SHA384, reference

IMAGE = DIGITS_SAMPLES / "digit-3.png"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "end-user.toml"
    path.write_text(reference().to_toml())
    return path


def test_query_prints_verification_then_classes(
    fake: FakeEnclave, address: str, manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--enclave", address, "--manifest", str(manifest), str(IMAGE)]) == 0
    out = capsys.readouterr().out
    assert f"enclave {address} verified" in out
    assert "  deployment  demo\n" in out
    assert "platform    sim" in out
    assert f"!!! {SIMULATION_WARNING} !!!" in out
    assert "code        sha384" in out
    assert f"model       sha384 {MODEL_SHA384.hex()[:32]}" in out
    assert "1. three" in out
    assert "90.00%" in out
    assert "remaining quota: 7" in out
    (request,) = fake.requests
    assert request.image == IMAGE.read_bytes()
    assert request.top_k == 3


def test_json_is_one_object(address: str, manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--enclave", address, "--manifest", str(manifest), "--json", "--top", "2", str(IMAGE)]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True
    assert (doc["enclave"], doc["deployment"]) == (address, "demo")
    assert doc["simulated"] is True
    assert "SIMULATED" in doc["warning"]
    assert doc["verification"]["platform"] == "sim"
    assert doc["verification"]["model_sha384"] == MODEL_SHA384.hex()
    assert [p["label"] for p in doc["top"]] == ["three", "eight"]
    assert doc["remaining_quota"] == 7


def test_flags_default_from_the_environment(
    fake: FakeEnclave, address: str, manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUSTOS_ENCLAVE", address)
    monkeypatch.setenv("CUSTOS_MANIFEST", str(manifest))
    assert main([str(IMAGE)]) == 0
    assert len(fake.requests) == 1


# ------------------------------------------------------------------------ failures

Setup = Callable[[FakeEnclave, Path, Path], list[str]]


def _refused_manifest(fake: FakeEnclave, manifest: Path, tmp: Path) -> list[str]:
    manifest.write_text(reference(code_sha384="00" * 48).to_toml())
    return [str(IMAGE)]


def _enclave_says(code: grpc.StatusCode) -> Setup:
    def setup(fake: FakeEnclave, manifest: Path, tmp: Path) -> list[str]:
        fake.infer_status = code
        return [str(IMAGE)]

    return setup


def _not_an_image(fake: FakeEnclave, manifest: Path, tmp: Path) -> list[str]:
    fake.infer_status, fake.infer_details = grpc.StatusCode.INVALID_ARGUMENT, "input is not an image"
    return [str(DIGITS_SAMPLES / "not-an-image.txt")]


FAILURES = [
    ("verification-refused", _refused_manifest, 3, "VerificationRefusedError", "nothing was sent"),
    (
        "quota-exhausted",
        _enclave_says(grpc.StatusCode.RESOURCE_EXHAUSTED),
        4,
        "QuotaExhaustedError",
        "RESOURCE",
    ),
    ("suspended", _enclave_says(grpc.StatusCode.PERMISSION_DENIED), 5, "SuspendedError", "PERMISSION_DENIED"),
    (
        "not-ready",
        _enclave_says(grpc.StatusCode.FAILED_PRECONDITION),
        1,
        "NotReadyError",
        "FAILED_PRECONDITION",
    ),
    ("invalid-input", _not_an_image, 1, "InvalidInputError", "input is not an image"),
    ("missing-input", lambda f, m, t: [str(t / "absent.png")], 1, "InvalidInputError", "cannot read"),
    (
        "missing-manifest",
        lambda f, m, t: ["--manifest", str(t / "none.toml"), str(IMAGE)],
        1,
        "ClientError",
        "manifest",
    ),
]


@pytest.mark.parametrize(
    ("setup", "exit_code", "error", "reason"),
    [pytest.param(*row[1:], id=row[0]) for row in FAILURES],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_failure_is_one_line_and_its_exit_code(
    fake: FakeEnclave,
    address: str,
    manifest: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setup: Setup,
    exit_code: int,
    error: str,
    reason: str,
    as_json: bool,
) -> None:
    argv = ["--enclave", address, "--manifest", str(manifest), *(["--json"] if as_json else [])]
    assert main([*argv, *setup(fake, manifest, tmp_path)]) == exit_code
    captured = capsys.readouterr()
    if as_json:
        doc = json.loads(captured.out)
        assert doc["error"] == error
        assert reason in doc["reason"]
        assert doc["exit_code"] == exit_code
        assert captured.err == ""
    else:
        (line,) = captured.err.splitlines()
        assert line.startswith("custos-query: ")
        assert reason in line
    if exit_code == 3:
        assert fake.requests == []


def test_an_enclave_not_listening_exits_1_saying_what_likely_happened(
    manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as bound:  # bound, never listening, as after a zeroization
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        code = main(["--enclave", f"127.0.0.1:{port}", "--manifest", str(manifest), str(IMAGE)])
    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"custos-query: nothing is listening at 127.0.0.1:{port} (connection refused)")
    assert "zeroized its model and keys after a suspension or a long custodian outage" in line


def test_verbose_adds_every_mismatch_and_the_traceback(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "tampered.toml"
    manifest.write_text(reference(code_sha384="00" * 48, custodian_ca_sha256="11" * 32).to_toml())
    assert main(["--enclave", address, "--manifest", str(manifest), "--verbose", str(IMAGE)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "  - code measurement" in err
    assert "  - enclave pins custodian CA" in err


MISUSE = [
    ("no-enclave", ["--manifest", "m.toml", "x.png"], "--enclave"),
    ("no-manifest", ["--enclave", "h:1", "x.png"], "--manifest"),
    ("no-input", ["--enclave", "h:1", "--manifest", "m.toml"], "INPUT"),
    ("enclave-no-port", ["--enclave", "enclave.example", "--manifest", "m.toml", "x.png"], "HOST:PORT"),
    ("enclave-port-zero", ["--enclave", "h:0", "--manifest", "m.toml", "x.png"], "valid port"),
    ("top-zero", ["--enclave", "h:1", "--manifest", "m.toml", "--top", "0", "x.png"], "--top"),
    ("top-not-int", ["--enclave", "h:1", "--manifest", "m.toml", "--top", "two", "x.png"], "--top"),
    ("timeout-zero", ["--enclave", "h:1", "--manifest", "m.toml", "--timeout", "0", "x.png"], "--timeout"),
    ("unknown-flag", ["--enclave", "h:1", "--manifest", "m.toml", "--insecure", "x.png"], "--insecure"),
]


@pytest.mark.parametrize(("argv", "mentions"), [pytest.param(a, m, id=n) for n, a, m in MISUSE])
def test_misuse_exits_2(
    argv: list[str], mentions: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CUSTOS_ENCLAVE", raising=False)
    monkeypatch.delenv("CUSTOS_MANIFEST", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert mentions in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "mentions"),
    [("::1:8443", "argument --enclave: enclave address '::1:8443'"), ("", "--enclave is required")],
    ids=["bare-ipv6", "empty"],
)
def test_a_bad_enclave_address_from_the_environment_is_misuse(
    value: str, mentions: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CUSTOS_ENCLAVE", value)
    with pytest.raises(SystemExit) as info:
        main(["--manifest", "m.toml", "x.png"])
    assert info.value.code == 2
    assert mentions in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "3  verification refused (nothing was sent)" in out
    assert "CUSTOS_ENCLAVE" in out


def test_help_describes_every_argument_with_its_default_and_range() -> None:
    described = {action.dest: action.help or "" for action in _parser()._actions if action.dest != "help"}
    assert set(described) == {
        "enclave",
        "manifest",
        "input",
        "top",
        "timeout",
        "json",
        "verbose",
        "pccs",
        "amd_kds",
    }
    for dest, text in described.items():
        assert "default" in text or dest == "input", dest
    assert "PNG or JPEG file of 1 byte to 8 MiB" in described["input"]
    assert f"1 to {MAX_TOP_K} (default 3)" in described["top"]
    assert "more than 0 and at most 3600 (default 30)" in described["timeout"]


# ------------------------------------------------------------------------ what it talked to


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_refusal_after_verification_names_the_deployment(
    fake: FakeEnclave, address: str, manifest: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    fake.infer_status, fake.infer_details = grpc.StatusCode.RESOURCE_EXHAUSTED, "quota exhausted"
    argv = ["--enclave", address, "--manifest", str(manifest), str(IMAGE)]
    assert main([*argv, *(["--json"] if as_json else [])]) == 4
    captured = capsys.readouterr()
    if as_json:
        doc = json.loads(captured.out)
        assert (doc["enclave"], doc["deployment"], doc["exit_code"]) == (address, "demo", 4)
    else:
        assert (
            captured.err
            == "custos-query: deployment demo: enclave answered RESOURCE_EXHAUSTED: quota exhausted\n"
        )


def test_a_deployment_name_with_control_characters_is_shown_escaped(
    manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeEnclave()
    fake.enclave = replace(fake.enclave, claims=replace(fake.enclave.claims, deployment="acme\x1b[2J\r"))
    with serving(fake) as address:
        assert main(["--enclave", address, "--manifest", str(manifest), str(IMAGE)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "  deployment  acme\\x1b[2J\\r\n" in out


def test_a_reader_that_leaves_early_ends_the_query_quietly(
    fake: FakeEnclave, address: str, manifest: Path
) -> None:
    """`custos-query ... | head -1`: the pipe closes before the answer is written; no traceback, exit 1."""
    query = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "--enclave", address, "--manifest", str(manifest), str(IMAGE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert query.stdout is not None
    query.stdout.close()  # the reader is gone before the first line
    _, err = query.communicate(timeout=120)
    assert err == b""
    assert query.returncode == 1
