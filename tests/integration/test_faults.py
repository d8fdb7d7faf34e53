"""Metering that survives faults: real custodian and enclave processes, real sockets, real crashes.

What each test holds the system to is in its docstring; the lease rules it
relies on are in the README (Quota and leases). Nothing here sleeps to assert a
timing: conditions are polled with deadlines.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from client import connect
from client.errors import ClientError, EnclaveUnavailableError, QuotaExhaustedError
from enclave._daemon.config import custodian_ca_der
from enclave._daemon.measured import reference_values
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc
from testkit.processes import DIGITS_MODEL, DIGITS_SAMPLES, Enclave, poll, script
from tests.unit.custodian.fake_enclave import FakeEnclave, sim_manifest

from ._loopback import Loopback

pytestmark = pytest.mark.integration
_names = (f"f{i}" for i in itertools.count())
IMAGE = (DIGITS_SAMPLES / "digit-7.png").read_bytes()


class Lab(Loopback):
    """One custodian process with the demo model; deployments and enclave processes made per test."""

    def deployment(
        self,
        *,
        grant: int,
        grace: int = 30,
        lease_size: int = 100,
        zeroize_after: int = 0,
        reference: str | None = None,
    ) -> tuple[str, str]:
        name = next(_names)
        # The manifest `enclave manifest` writes, made now: the code it measures is the code on disk.
        manifest = self.tmp / f"{name}-enclave.toml"
        ca_der = custodian_ca_der(self.ca.read_bytes())
        manifest.write_text(reference or reference_values("sim", ca_der).to_toml())
        created = self.custodian.console(
            "deployment", "create", name, "--model", "digits", "--manifest", str(manifest),
            "--offline-grace", str(grace), "--lease-size", str(lease_size),
            "--zeroize-after", str(zeroize_after),
        )  # fmt: skip
        self.custodian.console("grant", name, str(grant))
        return name, created["join_token"]

    def enclaves_of(self, name: str) -> dict[str, dict[str, Any]]:
        return {e["instance_id"]: e for e in self.custodian.console("enclaves", "--deployment", name)}

    def audit(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Export the audit log, verify the export offline, and return the verdict and the entries."""
        out = self.tmp / f"audit-{time.monotonic_ns()}.jsonl"
        self.custodian.console("audit", "export", "--out", str(out))
        verdict = self.custodian.console("audit", "verify", str(out))
        entries = [json.loads(line) for line in out.read_text().splitlines()]
        return verdict, [e for e in entries if e["type"] == "entry"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab(tmp_path_factory.mktemp("faults")) as lab:
        yield lab


class Tally:
    """Outcomes of queries sent from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def query(self, conn: Any) -> str:
        try:
            conn.infer_image(IMAGE)
            outcome = "served"
        except QuotaExhaustedError:
            outcome = "exhausted"
        except EnclaveUnavailableError:
            outcome = "unavailable"
        except ClientError:
            outcome = "failed"
        with self._lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
        return outcome

    def __getitem__(self, outcome: str) -> int:
        with self._lock:
            return self.counts.get(outcome, 0)


def _charged(usage: dict[str, Any]) -> int:
    return int(usage["used"]) + int(usage["unreported"])


def _instance_id(enclave: Enclave) -> str:
    ready: dict[str, Any] = json.loads(enclave.ready_file.read_text())
    return str(ready["instance_id"])


# --------------------------------------------------------------------- kill -9 of the enclave


def test_enclave_killed_mid_burst_is_charged_at_most_its_declared_worst_case(lab: Lab) -> None:
    """kill -9 of an enclave during a burst, then a fresh enclave: usage is bounded on both sides.

    The ledger charges at least what clients received, and at most that plus the
    declared worst case: the killed instance's unreported lease remainder, and
    the calls in flight at the kill (served, but their answers lost).
    """
    lease_size = 20
    name, token = lab.deployment(grant=200, grace=3, lease_size=lease_size)
    manifest = lab.end_user_manifest(name)
    first = lab.enclave(name, token)
    tally = Tally()
    with connect(first.address, manifest) as conn, ThreadPoolExecutor(12) as pool:
        burst = [pool.submit(tally.query, conn) for _ in range(400)]
        poll(lambda: tally["served"] >= 30, deadline=30, interval=0.01)
        first.stop(signal.SIGKILL)
        wait(burst)
    before_kill = tally["served"]
    in_flight = tally["failed"] + tally["unavailable"]
    assert before_kill >= 30
    assert in_flight > 0

    second = lab.enclave(name, token)
    with connect(second.address, manifest) as conn:
        for _ in range(10):
            assert tally.query(conn) == "served"
    assert second.stop(signal.SIGTERM) == 0
    served = tally["served"]

    killed = str(first.ready["instance_id"])
    listed = poll(lambda: (e := lab.enclaves_of(name))[killed]["lease_state"] == "expired" and e, deadline=30)
    usage = lab.custodian.usage(name)
    assert 0 < usage["unreported"] <= lease_size
    assert served <= _charged(usage) <= served + usage["unreported"] + in_flight
    # The fresh enclave is another instance with another lease: the killed lease cannot be spent again.
    [new] = [e for i, e in listed.items() if i != killed]
    assert (new["state"], new["lease_state"]) == ("stopped", "closed")
    assert new["lease_id"] != listed[killed]["lease_id"]
    verdict, entries = lab.audit()
    assert verdict["intact"]
    opened = [e["detail"]["lease"] for e in entries if e["action"] == "lease.open" and e["subject"] == name]
    assert len(opened) == len(set(opened)) == 2
    assert verdict["deployments"][name] == {"proven": usage["used"], "unreported": usage["unreported"]}


# ------------------------------------------------------------------- kill -9 of the custodian


def test_custodian_killed_mid_reports_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """kill -9 of the custodian while usage reports and grants stream in, then a restart.

    Everything acknowledged before the crash is still there, byte for byte in the
    audit chain; nothing is counted twice: once the enclave has reported its
    last unit, the ledger's usage equals the successes the clients saw.
    """
    with Lab(tmp_path) as lab:
        name, token = lab.deployment(grant=100, grace=10, lease_size=10)
        enclave = lab.enclave(name, token)
        tally, stop = Tally(), threading.Event()
        grants = {"acked": 0, "failed": 0}

        def grant_loop() -> None:
            while not stop.is_set():
                done = subprocess.run(
                    [script("custodian"), "--data", str(lab.custodian.data), "grant", name, "1"],
                    env=lab.env,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
                grants["acked" if done.returncode == 0 else "failed"] += 1

        with connect(enclave.address, lab.end_user_manifest(name)) as conn, ThreadPoolExecutor(5) as pool:

            def query_loop() -> None:
                while not stop.is_set():
                    tally.query(conn)

            workers = [pool.submit(query_loop) for _ in range(4)] + [pool.submit(grant_loop)]
            poll(lambda: lab.custodian.usage(name)["used"] >= 20 and grants["acked"] >= 2, deadline=60)
            _, snapshot = lab.audit()
            lab.custodian.stop(signal.SIGKILL)
            lab.custodian.start()
            poll(
                lambda: lab.enclaves_of(name)[enclave.ready["instance_id"]]["state"] == "connected",
                deadline=30,
            )
            poll(lambda: tally["served"] >= 40, deadline=30, interval=0.05)
            stop.set()
            for worker in workers:
                worker.result()
        assert enclave.stop(signal.SIGTERM) == 0
        served = tally["served"]

        usage = lab.custodian.usage(name)
        assert (usage["used"], usage["unreported"]) == (served, 0)
        verdict, entries = lab.audit()
        assert verdict["intact"]
        # Nothing acknowledged before the crash is lost or changed.
        assert entries[: len(snapshot)] == snapshot
        # Nothing is duplicated: one entry per grant that went through, one receipt per sequence number.
        recorded = [e for e in entries if e["action"] == "quota.grant" and e["subject"] == name]
        assert grants["acked"] + 1 <= len(recorded) <= grants["acked"] + grants["failed"] + 1
        assert usage["granted_total"] == 100 + len(recorded) - 1
        seqs = [e["detail"]["seq"] for e in entries if e["action"] == "receipt"]
        assert seqs == list(range(1, len(seqs) + 1))
        opened = [e["detail"]["lease"] for e in entries if e["action"] == "lease.open"]
        assert len(opened) == len(set(opened))
        assert verdict["deployments"][name] == {"proven": served, "unreported": 0}


# ---------------------------------------------------------------------------- network cuts


def _serves(conn: Any, tally: Tally) -> Callable[[], bool]:
    return lambda: tally.query(conn) == "served"


def test_cuts_shorter_than_the_grace_go_unnoticed_longer_ones_stop_and_zeroize(lab: Lab) -> None:
    """The custodian frozen (SIGSTOP: connections hang, as on a cut network) for three lengths of time.

    Shorter than the grace: every query is served. Longer: the enclave refuses
    (UNAVAILABLE) and serves again, as the same instance, once the custodian is
    back. Longer than the zeroize-after time: the enclave drops the model and its
    keys and, once the custodian is back, enrols again as a new instance.
    """
    # A lease large enough that no top-up is needed while the custodian is away.
    name, token = lab.deployment(grant=5000, grace=3, lease_size=1000, zeroize_after=7)
    manifest = lab.end_user_manifest(name)
    enclave = lab.enclave(name, token)
    custodian = lab.custodian.proc
    assert custodian is not None
    tally = Tally()
    first = _instance_id(enclave)
    with connect(enclave.address, manifest) as conn:
        # A heartbeat every second, so the enclave heard from the custodian within the last one.
        poll(lambda: lab.enclaves_of(name)[first]["state"] == "connected")
        custodian.send_signal(signal.SIGSTOP)
        try:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                assert tally.query(conn) == "served"
                time.sleep(0.05)  # pacing: a few dozen queries, not a lease's worth
        finally:
            custodian.send_signal(signal.SIGCONT)

        poll(lambda: lab.enclaves_of(name)[first]["state"] == "connected")
        custodian.send_signal(signal.SIGSTOP)
        try:
            poll(lambda: tally.query(conn) == "unavailable", deadline=15, interval=0.2)
        finally:
            custodian.send_signal(signal.SIGCONT)
        poll(_serves(conn, tally), deadline=20, interval=0.2)
        assert _instance_id(enclave) == first

        custodian.send_signal(signal.SIGSTOP)
        try:
            poll(
                lambda: enclave.metric("custos_enclave_zeroizations_total", reason="offline") == 1,
                deadline=20,
            )
            assert enclave.metric("custos_enclave_model_loaded") == 0
        finally:
            custodian.send_signal(signal.SIGCONT)
    second = poll(lambda: (i := _instance_id(enclave)) != first and i, deadline=30)
    with connect(enclave.address, manifest) as conn:
        poll(_serves(conn, tally), deadline=10, interval=0.2)
    assert enclave.stop(signal.SIGTERM) == 0
    served = tally["served"]

    listed = lab.enclaves_of(name)
    assert (listed[second]["state"], listed[first]["state"]) == ("stopped", "offline")
    # The zeroized instance cannot report its last lease once it has zeroized: the lease expires,
    # charged in full. A report it sent before, still in flight while the custodian was frozen, may
    # arrive after the expiry and settle the lease at the usage its receipt proves: either way
    # every served query is charged, and no more than the lease's unreported remainder beyond.
    poll(lambda: lab.enclaves_of(name)[first]["lease_state"] == "expired", deadline=20)
    usage = lab.custodian.usage(name)
    assert served <= _charged(usage) <= served + usage["unreported"]
    verdict, entries = lab.audit()
    assert verdict["intact"]
    actions = {e["action"] for e in entries if e["subject"] == name}
    assert "lease.expire" in actions


# ------------------------------------------------------------------------ borrower's attacks


def test_replayed_reordered_and_foreign_receipts_are_refused_and_recorded(lab: Lab) -> None:
    """A borrower replaying an old receipt, reordering receipts, or signing with another instance's key."""
    ca_pem = lab.ca.read_bytes()
    # The fake borrower measures the code as the test process loaded it.
    name, token = lab.deployment(grant=50, lease_size=20, reference=sim_manifest(ca_pem))
    endpoints = lab.custodian.endpoints
    model_sha384 = hashlib.sha384(DIGITS_MODEL.read_bytes()).digest()

    async def attacks() -> dict[str, str]:
        tls = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        options = [("grpc.ssl_target_name_override", "custodian.custos")]
        channels: list[grpc.aio.Channel] = []

        async def enrol() -> tuple[FakeEnclave, Any]:
            channel = grpc.aio.secure_channel(endpoints["enrolment"], tls, options=options)
            channels.append(channel)
            stub = pb_grpc.EnclaveGatewayStub(channel)
            enclave = FakeEnclave(ca_pem, name)
            challenge = await stub.GetChallenge(pb.ChallengeRequest(deployment=name))
            enrolled = await stub.Enrol(enclave.enrol_request(challenge.nonce, token))
            enclave.instance_id, enclave.model_sha384 = enrolled.instance_id, model_sha384
            mtls = grpc.ssl_channel_credentials(ca_pem, enclave.key_pem, enrolled.certificate)
            channel = grpc.aio.secure_channel(endpoints["gateway"], mtls, options=options)
            channels.append(channel)
            return enclave, pb_grpc.EnclaveGatewayStub(channel)

        def report(enclave: FakeEnclave, lease: str, used: int, **forged: Any) -> pb.UsageReport:
            receipt, signed = enclave.receipt(lease, used, **forged)
            return pb.UsageReport(
                lease_id=lease,
                seq=receipt.seq,
                used=used,
                receipt=pb.Receipt(body=signed.body, signature=signed.signature),
            )

        async def accepted(stub: Any, enclave: FakeEnclave, lease: str, used: int) -> pb.UsageReport:
            message = report(enclave, lease, used)
            await stub.ReportUsage(message)
            enclave.accepted(enclave.receipt(lease, used)[0])
            return message

        async def refused(stub: Any, message: pb.UsageReport) -> str:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.ReportUsage(message)
            assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
            return str(failed.value.details())

        try:
            me, mine = await enrol()
            other, _ = await enrol()
            lease = (await mine.AcquireLease(pb.LeaseRequest())).lease_id
            first = await accepted(mine, me, lease, 3)
            await accepted(mine, me, lease, 5)
            second, _ = me.receipt(lease, 6)
            details = {
                "replay": await refused(mine, first),
                "sequence": await refused(
                    mine, report(me, lease, 7, seq=second.seq + 1, prev=second.digest())
                ),
                "signature": await refused(mine, report(me, lease, 6, key=other.key)),
            }
            # The genuine chain goes on: the custodian's state was not disturbed.
            await mine.ReportUsage(report(me, lease, 6))
            return details
        finally:
            for channel in channels:
                await channel.close(None)

    details = asyncio.run(attacks())
    for reason, text in details.items():
        assert f"receipt refused ({reason})" in text
    assert lab.custodian.usage(name)["used"] == 6
    verdict, entries = lab.audit()
    assert verdict["intact"]
    refusals = [
        e["detail"]["reason"] for e in entries if e["action"] == "receipt.refuse" and e["subject"] == name
    ]
    assert refusals == ["replay", "sequence", "signature"]
    assert lab.custodian.metric("custos_custodian_receipt_refusals_total", reason="replay") >= 1


# ---------------------------------------------------------------------------- exactness


def test_exactly_the_balance_is_served_under_load_across_two_instances(lab: Lab) -> None:
    """1,000 concurrent queries across two enclave instances of one deployment with a balance of 300."""
    name, token = lab.deployment(grant=300)
    manifest = lab.end_user_manifest(name)
    enclaves = [lab.enclave(name, token), lab.enclave(name, token)]
    tally = Tally()
    connections = [connect(e.address, manifest) for e in enclaves]
    try:
        with ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(lambda i: tally.query(connections[i % 2]), range(1000)))
    finally:
        for conn in connections:
            conn.close()
    assert outcomes.count("served") == 300
    assert outcomes.count("exhausted") == 700, tally.counts
    for enclave in enclaves:
        assert enclave.stop(signal.SIGTERM) == 0
    usage = lab.custodian.usage(name)
    assert (usage["used"], usage["balance"], usage["leased"], usage["unreported"]) == (300, 0, 0, 0)
