"""The custodian CLI end to end: a real `custodian serve` process and console commands against it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from enclave.attestation import ReferenceValues
from tests.integration.custodian.harness import onnx_model
from tests.unit.custodian.fake_enclave import sim_manifest

pytestmark = pytest.mark.integration


def _cli(data: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        # Global options go before the command here; the unit tests put them after it.
        [sys.executable, "-m", "custodian.cli", "--data", str(data), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == expect, done.stderr
    return done


def _json(data: Path, *args: str) -> Any:
    return json.loads(_cli(data, *args, "--json").stdout)


def test_serve_and_administer_from_the_console(tmp_path: Path) -> None:
    data = tmp_path / "data"
    model = tmp_path / "net.onnx"
    model.write_bytes(onnx_model(50_000))
    serve = [
        "serve",
        "--json",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]
    server = subprocess.Popen(
        [sys.executable, "-m", "custodian.cli", "--data", str(data), *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline())
        assert ready == json.loads((data / "endpoints.json").read_text())
        assert ready["admin_socket"] == str(data / "admin.sock")
        assert ready["metrics"].startswith("127.0.0.1:")

        ca = _json(data, "ca")
        assert ca["sha256"] == ready["custodian_ca_sha256"]
        added = _json(data, "model", "add", str(model))
        assert (added["name"], added["size"]) == ("net", len(model.read_bytes()))
        assert added["inputs"] == "input float[1,16] tensor"
        assert added["sha384"] == hashlib.sha384(model.read_bytes()).hexdigest()
        assert [m["name"] for m in _json(data, "model", "list")] == ["net"]

        manifest = tmp_path / "manifest.toml"
        manifest.write_text(sim_manifest(ca["pem"].encode()))
        created = _json(data, "deployment", "create", "d", "--model", "net", "--manifest", str(manifest))
        assert created["name"] == "d"
        assert len(created["join_token"]) >= 32
        approved = ReferenceValues.from_toml(_cli(data, "deployment", "manifest", "d").stdout)
        assert approved.allowed_model_sha384 == (added["sha384"],)
        _manifest_out_follows_no_planted_symlink(data, tmp_path)

        assert _json(data, "grant", "d", "100")["changed"] == 100
        [usage] = _json(data, "usage")
        assert (usage["name"], usage["balance"], usage["granted_total"]) == ("d", 100, 100)
        assert _json(data, "revoke", "d", "--all")["changed"] == 100
        assert "suspended" in _cli(data, "suspend", "d").stdout
        assert _json(data, "enclaves") == []

        refused = _cli(data, "grant", "nope", "5", expect=1)
        assert refused.stderr.strip() == "custodian: no deployment 'nope'"
        audit = _json(data, "audit")
        assert audit["intact"]
        assert [e["action"] for e in audit["last"]] == [
            "model.add",
            "deployment.create",
            "quota.grant",
            "quota.revoke",
            "deployment.suspend",
        ]
        # Every admin action says where it came from: the socket, and what the console claims to be.
        origins = {e["detail"]["origin"] for e in audit["last"]}
        assert len(origins) == 1
        [origin] = origins
        assert origin.startswith(f"unix:{data / 'admin.sock'} console ")
        assert origin.endswith("(claimed)")

        # The same console over TCP, with an administrator's certificate.
        creds = tmp_path / "creds"
        issued = _json(data, "admin-cert", "ops", "--out", str(creds), "--days", "3")
        assert (creds / "ops.key").stat().st_mode & 0o777 == 0o600
        remote = [
            "--admin",
            ready["admin"],
            "--admin-key",
            issued["key"],
            "--admin-cert",
            issued["certificate"],
        ]
        remote += ["--custodian-ca", issued["custodian_ca"]]
        [usage] = _json(tmp_path / "elsewhere", *remote, "usage")
        assert usage["name"] == "d"
        assert _cli(data, "--admin", ready["admin"], "usage", expect=2).returncode == 2

        # Output files that exist are found before anything is issued (the audit count below holds).
        again = _cli(data, "admin-cert", "ops", "--out", str(creds), expect=1)
        assert again.stderr == f"custodian: {creds / 'ops.pem'} exists; remove it or choose another --out\n"
        swapped = [
            *remote[:2],
            "--admin-key",
            issued["certificate"],
            "--admin-cert",
            issued["key"],
            *remote[6:],
        ]
        said = _cli(tmp_path, *swapped, "usage", expect=1).stderr
        assert "(are --admin-key and --admin-cert swapped?)" in said
        stranger_ca = tmp_path / "stranger-ca.pem"
        stranger_ca.write_bytes((data / "enclave-ca.pem").read_bytes())
        wrong_ca = [*remote[:6], "--custodian-ca", str(stranger_ca)]
        said = _cli(tmp_path, *wrong_ca, "usage", expect=1).stderr
        assert said == (
            f"custodian: the certificate of the custodian at {ready['admin']} does not chain to"
            f" --custodian-ca {stranger_ca}\n"
        )

        # A reader that went away (`| head`): no error, the status a SIGPIPE gives.
        read_end, write_end = os.pipe()
        os.close(read_end)
        with os.fdopen(write_end, "wb") as closed:
            gone = subprocess.run(
                [sys.executable, "-m", "custodian.cli", "--data", str(data), "usage"],
                stdout=closed,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
                timeout=60,
            )
        assert (gone.returncode, gone.stderr) == (141, "")

        export = tmp_path / "audit.jsonl"
        assert _json(data, "audit", "export", "--out", str(export))["entries"] == 6
        assert (
            _json(data, "audit", "export", "--since", "4", "--out", str(tmp_path / "tail.jsonl"))["first_seq"]
            == 4
        )
        verdict = _json(data, "audit", "verify", str(export))
        assert (verdict["intact"], verdict["entries"], verdict["receipts"]) == (True, 6, 0)
        export.write_text(export.read_text().replace('"units":100', '"units":1000'))
        assert "does not match its hash chain" in _cli(data, "audit", "verify", str(export), expect=1).stderr
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "Traceback" not in err
    assert not (data / "admin.sock").exists()
    assert "audit log intact: 6 entries" in _cli(data, "audit").stdout


def _manifest_out_follows_no_planted_symlink(data: Path, tmp_path: Path) -> None:
    """`deployment manifest --out` refuses a symlink at `<out>.partial` and replaces one at `<out>`."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "end-user.toml"
    planted = tmp_path / "end-user.toml.partial"
    planted.symlink_to(victim)
    refused = _cli(data, "deployment", "manifest", "d", "--out", str(out), expect=1)
    assert "end-user.toml.partial exists" in refused.stderr
    assert victim.read_text() == "precious"
    planted.unlink()
    out.symlink_to(victim)
    _cli(data, "deployment", "manifest", "d", "--out", str(out))
    assert victim.read_text() == "precious"
    assert ReferenceValues.from_toml(out.read_text()).platform == "sim"
    assert out.stat().st_mode & 0o777 == 0o600
