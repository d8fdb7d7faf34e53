"""The ``enclave`` command: manifest, argument misuse, domain errors, serve and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from enclave._daemon.cli import main
from enclave._daemon.measured import reference_values
from enclave.attestation import ReferenceValues, measurement
from enclave.attestation.sim import BOOT_MEASUREMENT
from enclave.identity import ENCLAVE_TLS_NAME
from protos import custos_pb2, custos_pb2_grpc
from tests.unit.enclave.fake_custodian import CertAuthority, FakeCustodian, FakeGateway, ThreadedCustodian
from tests.unit.enclave.test_daemon_link import eventually
from tests.unit.enclave.test_daemon_service import png
from tests.unit.enclave.tiny_model import tiny_classifier

ENCLAVE = Path(sys.executable).parent / "enclave"


@pytest.fixture(autouse=True)
def _no_enclave_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ENCLAVE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def ca_file(tmp_path: Path) -> tuple[Path, CertAuthority]:
    ca = CertAuthority("custodian test CA")
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.pem)
    return path, ca


def test_manifest_writes_the_reference_values(
    ca_file: tuple[Path, CertAuthority], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, ca = ca_file
    out = tmp_path / "manifest.toml"
    assert (
        main(["manifest", "--platform", "sim", "--custodian-ca", str(path), "--out", str(out), "--json"]) == 0
    )
    written = ReferenceValues.from_toml(out.read_text())
    assert written == reference_values("sim", ca.der)
    assert written.allow_simulation
    assert written.custodian_ca_sha256 == measurement.custodian_ca_sha256(ca.der)
    assert written.code_sha384 == measurement.code_sha384().hex()
    assert written.registers == {"sim.boot": BOOT_MEASUREMENT.hex()}
    captured = capsys.readouterr()
    assert "SIMULATION" in captured.err
    assert json.loads(captured.out)["code_sha384"] == written.code_sha384


def test_flags_default_from_the_environment(
    ca_file: tuple[Path, CertAuthority], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCLAVE_CUSTODIAN_CA", str(ca_file[0]))
    out = tmp_path / "m.toml"
    assert main(["manifest", "--out", str(out)]) == 0
    assert ReferenceValues.from_toml(out.read_text()).platform == "sim"


def test_flags_with_a_built_in_default_take_their_environment_value(
    ca_file: tuple[Path, CertAuthority], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ENCLAVE_PLATFORM (manifest) and ENCLAVE_PCCS (serve) once crashed argparse set-up with a TypeError
    monkeypatch.setenv("ENCLAVE_CUSTODIAN_CA", str(ca_file[0]))
    monkeypatch.setenv("ENCLAVE_PLATFORM", "sim")
    monkeypatch.setenv("ENCLAVE_PCCS", "https://pccs.example:8081")
    out = tmp_path / "m.toml"
    assert main(["manifest", "--out", str(out)]) == 0
    assert ReferenceValues.from_toml(out.read_text()).platform == "sim"


SERVE_MINIMAL = ["serve", "--custodian", "h:1", "--custodian-ca", "c", "--deployment", "d",
                 "--listen", "h:0", "--token", "t", "--platform", "sim"]  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-command"),
        pytest.param(["frobnicate"], id="unknown-command"),
        pytest.param(["manifest", "--out", "x.toml"], id="manifest-without-ca"),
        pytest.param(
            ["manifest", "--custodian-ca", "ca.pem", "--out", "x", "--platform", "nitro"], id="platform"
        ),
        pytest.param(["serve", "--custodian-ca", "ca.pem"], id="serve-missing-flags"),
        pytest.param(
            [
                "serve",
                "--custodian",
                "h:1",
                "--custodian-ca",
                "c",
                "--deployment",
                "d",
                "--listen",
                "h:0",
                "--token",
                "t",
            ],
            id="serve-without-platform",
        ),
        pytest.param([*SERVE_MINIMAL, "--generation-streams", "0"], id="no-generation-streams"),
        pytest.param([*SERVE_MINIMAL, "--generation-streams", "two"], id="generation-streams-not-a-number"),
        pytest.param([*SERVE_MINIMAL, "--generation-queue", "5000"], id="generation-queue-too-long"),
    ],
)
def test_argument_misuse_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def serve_argv(ca: Path, **flags: str | None) -> list[str]:
    """``enclave serve`` flags; a flag given as None is left out."""
    argv: dict[str, str | None] = {
        "--custodian": "127.0.0.1:1",
        "--custodian-ca": str(ca),
        "--deployment": "demo",
        "--token": "t",
        "--listen": "127.0.0.1:0",
        "--platform": "sim",
    }
    argv.update(flags)
    return ["serve", *(item for flag, value in argv.items() if value is not None for item in (flag, value))]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["manifest", "--custodian-ca", "/nonexistent/ca.pem", "--out", "x"],
            "cannot read --custodian-ca",
            id="no-ca",
        ),
        pytest.param(
            ["manifest", "--custodian-ca", __file__, "--out", "x"], "not a PEM certificate", id="ca-not-pem"
        ),
        pytest.param(None, "--listen must be HOST:PORT", id="bad-listen"),
    ],
)
def test_domain_errors_print_one_line_and_exit_1(
    argv: list[str] | None,
    message: str,
    ca_file: tuple[Path, CertAuthority],
    capsys: pytest.CaptureFixture[str],
) -> None:
    if argv is None:
        argv = serve_argv(ca_file[0], **{"--listen": "nowhere"})
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("enclave: error: ")
    assert message in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize(
    ("custodian", "message"),
    [
        pytest.param("h:1,,h:2", "--custodian takes 1 to 16 addresses", id="empty-address"),
        pytest.param(",".join(f"h:{p}" for p in range(1, 18)), "1 to 16 addresses", id="too-many"),
        pytest.param("h:1,h", "--custodian must be HOST:PORT, got 'h'", id="one-bad-address"),
    ],
)
def test_a_bad_list_of_custodian_replicas_is_named(
    custodian: str, message: str, ca_file: tuple[Path, CertAuthority], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(serve_argv(ca_file[0], **{"--custodian": custodian})) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("enclave: error: ")
    assert message in err[-1]


def test_serve_until_sigterm_sends_the_final_report(tmp_path: Path) -> None:
    gateway = FakeGateway(model=tiny_classifier().data, balance=50, lease_size=10)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(gateway.custodian_ca.pem)
    ready_file = tmp_path / "ready.json"

    async def run() -> None:
        async with FakeCustodian(gateway) as custodian:
            env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
            env["ENCLAVE_TOKEN"] = gateway.token
            process = await asyncio.create_subprocess_exec(
                str(ENCLAVE),
                "serve",
                *serve_argv(
                    ca,
                    **{
                        "--custodian": custodian.address,
                        "--ready-file": str(ready_file),
                        "--metrics": "127.0.0.1:0",
                        "--token": None,  # from ENCLAVE_TOKEN
                    },
                )[1:],
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )

            def started() -> bool:
                return ready_file.exists() or process.returncode is not None

            try:
                await eventually(started, "ready file", 60)
                assert ready_file.exists(), (await process.stderr.read()).decode()  # type: ignore[union-attr]
                ready = json.loads(ready_file.read_text())
                assert ready["instance_id"] in gateway.instances
                assert ready["model_sha384"] == gateway.sha384.hex()
                assert ready["metrics"].startswith("127.0.0.1:")
                host, port = ready["inference"].rsplit(":", 1)
                cert = await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)))
                async with grpc.aio.secure_channel(
                    ready["inference"],
                    grpc.ssl_channel_credentials(root_certificates=cert.encode()),
                    options=[("grpc.ssl_target_name_override", ENCLAVE_TLS_NAME)],
                ) as channel:
                    reply = await custos_pb2_grpc.InferenceStub(channel).Infer(
                        custos_pb2.InferRequest(image=png())
                    )
                    assert reply.model_sha384 == gateway.sha384.hex()
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(60):
                    stdout, stderr = await process.communicate()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode == 0, stderr.decode()
            assert f"enclave serving on {ready['inference']} (deployment demo" in stdout.decode()
            assert "SIMULATION" in stderr.decode()
            assert gateway.token not in stderr.decode() + stdout.decode()
            final = gateway.reports[-1]
            assert (final.final, final.used) == (True, 1)

    asyncio.run(run())


def test_serve_exits_1_with_the_refusal_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = FakeGateway(model=tiny_classifier().data)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(gateway.custodian_ca.pem)

    with ThreadedCustodian(gateway) as custodian:
        assert main(serve_argv(ca, **{"--custodian": custodian.address, "--token": "wrong"})) == 1
    assert (
        "custodian refused enrolment (PERMISSION_DENIED): join token is not valid" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(
            {"--tpm": "device:/dev/tpmrm0"}, "the --tpm flags are for --platform tpm", id="tpm-on-sim"
        ),
        pytest.param({"--platform": "tpm"}, "--platform tpm needs --tpm TCTI", id="tpm-without-tcti"),
        pytest.param({"--tsm-report": "/tmp"}, "are for tdx, sev-snp and sgx", id="tsm-on-sim"),
    ],
)
def test_flags_that_do_not_go_together_are_misuse_exit_2(
    flags: dict[str, str],
    message: str,
    ca_file: tuple[Path, CertAuthority],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 13 item 19: these exited 1 like a domain error."""
    assert main(serve_argv(ca_file[0], **flags)) == 2
    err = capsys.readouterr().err
    assert "usage: enclave serve" in err
    assert message in err


def test_json_errors_are_one_json_object(
    ca_file: tuple[Path, CertAuthority], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13 item 19: with --json, a domain error was plain text."""
    assert main([*serve_argv(ca_file[0], **{"--listen": "nowhere"}), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "error": "ConfigError",
        "reason": "--listen must be HOST:PORT, got 'nowhere'",
        "exit_code": 1,
    }


def test_help_describes_the_command_and_the_platform_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "manifest (write this build's reference values) or serve" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "attestation platform, required" in text
    assert "port 0 to 65535, 0 picks a free one" in text
    assert "0 to 23 (default 15)" in text
    assert "removed on exit" in text


def test_a_closed_pipe_is_no_error(ca_file: tuple[Path, CertAuthority], tmp_path: Path) -> None:
    """Issue 13 item 19: ``enclave manifest ... | head -c0`` printed a BrokenPipeError traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
    argv = [str(ENCLAVE), "manifest", "--platform", "sim", "--custodian-ca", str(ca_file[0])]
    process = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "m.toml"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.stderr.read().decode()
    process.stderr.close()
    process.wait(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert "BrokenPipe" not in stderr, stderr


def test_manifest_pins_a_minimum_tcb_evaluation_for_tdx(
    ca_file: tuple[Path, CertAuthority], tmp_path: Path
) -> None:
    out = tmp_path / "tdx.toml"
    registers = [f"--register={name}={'ab' * 48}" for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2")]
    argv = ["manifest", "--platform", "tdx", "--custodian-ca", str(ca_file[0]), "--out", str(out)]
    assert main([*argv, *registers, "--min-tcb-evaluation-data-number", "17"]) == 0
    assert ReferenceValues.from_toml(out.read_text()).min_tcb_evaluation_data_number == 17


@pytest.mark.parametrize(
    ("platform", "number"),
    [("sim", "17"), ("tdx", "0"), ("tdx", "4294967296"), ("tdx", "seventeen")],
)
def test_a_minimum_tcb_evaluation_outside_tdx_sgx_or_its_range_is_misuse(
    ca_file: tuple[Path, CertAuthority], tmp_path: Path, platform: str, number: str
) -> None:
    out = tmp_path / "m.toml"
    argv = ["manifest", "--platform", platform, "--custodian-ca", str(ca_file[0]), "--out", str(out)]
    registers = [f"--register={name}={'ab' * 48}" for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2")]
    try:
        code = main(
            [*argv, *(registers if platform == "tdx" else []), "--min-tcb-evaluation-data-number", number]
        )
    except SystemExit as exited:  # argparse's own refusals exit; ours return the code
        code = exited.code  # type: ignore[assignment]
    assert code == 2
    assert not out.exists()
