"""The enclave daemon's life against a real custodian process: restarts, ports, start-up failures.

Real custodian and enclave processes on loopback (``testkit``). Conditions are
polled with deadlines; nothing sleeps to assert a timing.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from client import connect
from enclave._daemon.config import custodian_ca_der
from enclave._daemon.measured import reference_values
from testkit.processes import DIGITS_SAMPLES, Enclave, poll
from tests.unit.enclave.fake_custodian import CertAuthority

from ._loopback import Loopback

pytestmark = pytest.mark.integration
IMAGE = (DIGITS_SAMPLES / "digit-7.png").read_bytes()
RESTARTS = 3
# Long enough for the old backoff (up to 5 s, and gRPC's channel backoff on top) to outgrow a 3 s grace.
DOWN_FOR = 8.0


def _deployment(
    lab: Loopback, name: str, *, grant: int, grace: int, lease_size: int, zeroize_after: int = 0
) -> str:
    manifest = lab.tmp / f"{name}-enclave.toml"
    manifest.write_text(reference_values("sim", custodian_ca_der(lab.ca.read_bytes())).to_toml())
    created = lab.custodian.console(
        "deployment", "create", name, "--model", "digits", "--manifest", str(manifest),
        "--offline-grace", str(grace), "--lease-size", str(lease_size),
        "--zeroize-after", str(zeroize_after),
    )  # fmt: skip
    lab.custodian.console("grant", name, str(grant))
    return str(created["join_token"])


def _audit_actions(lab: Loopback, name: str) -> list[str]:
    out = lab.tmp / "audit.jsonl"
    lab.custodian.console("audit", "export", "--out", str(out))
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    return [e["action"] for e in entries if e.get("type") == "entry" and e.get("subject") == name]


def test_custodian_restarts_with_a_short_grace_lose_the_borrower_no_unit(tmp_path: Path) -> None:
    """Issue 13 item 11: with a 3 s offline grace, the custodian restarted several times.

    Each time the live enclave reconnects and refreshes its lease within the fresh
    grace: the lease is never expired and charged in full, the enclave never
    zeroizes, and in the end the deployment is charged exactly what was served.
    """
    with Loopback(tmp_path) as lab:
        # Zeroizing is not what is tested here: it waits far longer than the custodian stays down.
        token = _deployment(lab, "restarts", grant=1000, grace=3, lease_size=50, zeroize_after=120)
        enclave = lab.enclave("restarts", token)
        instance = enclave.ready["instance_id"]
        served = 0
        with connect(enclave.address, lab.end_user_manifest("restarts")) as conn:
            for _ in range(RESTARTS):
                conn.infer_image(IMAGE)
                served += 1
                assert lab.custodian.stop(signal.SIGTERM) == 0
                time.sleep(DOWN_FOR)  # the outage itself, not a wait for a result
                lab.custodian.start()
                poll(
                    lambda: next(
                        e for e in lab.custodian.console("enclaves", "--deployment", "restarts")
                        if e["instance_id"] == instance
                    )["state"] == "connected",
                    deadline=30,
                )  # fmt: skip
            # Well past the grace after the last restart: a lease not refreshed in time has expired by now.
            poll(lambda: lab.custodian.usage("restarts")["used"] == served, deadline=30)
            conn.infer_image(IMAGE)
            served += 1
        assert enclave.metric("custos_enclave_zeroizations_total") == 0
        assert enclave.stop(signal.SIGTERM) == 0
        usage = lab.custodian.usage("restarts")
        assert (usage["used"], usage["unreported"], usage["balance"]) == (served, 0, 1000 - served)
        actions = _audit_actions(lab, "restarts")
        assert "lease.expire" not in actions
        assert actions.count("lease.open") == 1


def test_a_taken_port_fails_the_start_before_enrolment_and_costs_nothing(tmp_path: Path) -> None:
    """Issue 13 items 9 and 10: the second enclave on a port exits 1 "address in use", enrols nothing."""
    with Loopback(tmp_path) as lab:
        token = _deployment(lab, "ports", grant=100, grace=30, lease_size=10)
        first = lab.enclave("ports", token)
        port = int(first.address.rsplit(":", 1)[1])
        second = Enclave(tmp_path / "second", lab.env)
        lab.enclaves.append(second)
        second.start(
            lab.custodian, lab.ca, "ports", token, wait=False, extra_args=["--listen", f"127.0.0.1:{port}"]
        )
        log = lab.refused(second)
        assert f"enclave: error: cannot listen on 127.0.0.1:{port}: address in use" in log
        assert "add_port.cc" not in log  # no raw gRPC C-core line on the console
        assert not second.ready_file.exists()
        enclaves = lab.custodian.console("enclaves", "--deployment", "ports")
        assert [e["instance_id"] for e in enclaves] == [first.ready["instance_id"]]
        usage = lab.custodian.usage("ports")
        assert usage["leased"] == 10  # the first enclave's lease alone


def test_sigterm_is_quiet_and_removes_the_ready_file(tmp_path: Path) -> None:
    """Issue 13 items 7 and 19: a normal stop logs no warning; the ready file goes; no core dumps."""
    with Loopback(tmp_path) as lab:
        token = _deployment(lab, "quiet", grant=100, grace=30, lease_size=10)
        enclave = lab.enclave("quiet", token)
        limits = Path(f"/proc/{enclave.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        with connect(enclave.address, lab.end_user_manifest("quiet")) as conn:
            conn.infer_image(IMAGE)
        assert enclave.stop(signal.SIGTERM) == 0
        assert not enclave.ready_file.exists()
        lines = enclave.log.read_text().splitlines()
        warnings = [line for line in lines if " WARNING " in line or " ERROR " in line]
        assert warnings == [], "\n".join(lines)


def test_a_wrong_custodian_ca_is_named_at_once(tmp_path: Path) -> None:
    """Issue 13 item 17: a CA the custodian's certificate does not chain to is a clear error, not a retry."""
    with Loopback(tmp_path) as lab:
        token = _deployment(lab, "wrongca", grant=10, grace=30, lease_size=10)
        other_ca = tmp_path / "other-ca.pem"
        other_ca.write_bytes(CertAuthority("another custodian's CA").pem)
        enclave = lab.enclave("wrongca", token, wait=False, ca=other_ca)
        log = lab.refused(enclave)
        assert "does not chain to --custodian-ca" in log, log
        assert "not reachable yet" not in log
        assert ".cc:" not in log  # no raw gRPC C-core line
