"""3. Custodian ledger: usage reports and lease grants per second that one custodian sustains.

Many simulated enclave instances (``bench._sim_enclave``) enrol for real with
sim evidence, then talk to the custodian's gateway over mutual TLS, one
connection each, as separate enclave processes would. Every usage report
carries a receipt signed by the instance's key, the next link of its chain,
exactly as the daemon sends it, on one long-lived ``ReportStream`` per
instance. Three loads, each against the same calls on the plain gRPC baseline
(mutual TLS, same messages, no ledger), alternating:

- saturation: every instance reports back to back (one report in flight per
  instance); reports per second, and the latencies at that load;
- offered load: reports at a fixed total rate (2,000/s), spread over the
  instances, each at most one in flight; latency measured from the moment a
  report was due, so a custodian that falls behind shows it (no coordinated
  omission). Target: p99 < 50 ms;
- lease grants: each instance closes its lease (final report) and acquires a
  new one, back to back; new leases per second.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc
import grpc.aio
from cryptography.hazmat.primitives.asymmetric import ec

from bench._context import Bench
from bench._processes import cpu_seconds
from bench._sim_enclave import CHANNEL_OPTIONS, SimInstance, stale_code
from bench._stats import Row, Target, percentile
from bench._tls import SERVER_NAME
from enclave.receipts import GENESIS, Receipt, sign_receipt
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc
from testkit.processes import DIGITS_MODEL, stopping

NAME = "ledger"
LEASE_SIZE = 1_000_000
_ATTEMPTS = 3  # enrolment is tried again in a new deployment when the sources changed meanwhile
TIMEOUT = 30.0
# Saturation rounds get receipts signed ahead for this many reports/s, above what even the plain baseline
# sustains here (up to about 8,300/s); past that, receipts are signed as they are sent.
SIGN_AHEAD_RATE = 12000


@dataclass(frozen=True)
class Signed:
    before: tuple[int, int, bytes]  # the chain's (seq, used, prev) before this receipt
    message: pb.UsageReport


@dataclass
class Reporter:
    """One instance's side of the gateway: its lease, its receipt chain, its channel."""

    key: ec.EllipticCurvePrivateKey
    instance_id: str
    deployment: str
    model_sha384: bytes
    channel: grpc.aio.Channel
    lease_id: str = ""
    used: int = 0
    seq: int = 0
    prev: bytes = GENESIS
    stub: pb_grpc.EnclaveGatewayAsyncStub = field(init=False)
    # Reports go on one long-lived ReportStream, as the enclave daemon sends them.
    stream: grpc.aio.StreamStreamCall[pb.UsageReport, pb.ReportReply] | None = None
    ahead: deque[Signed] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.stub = pb_grpc.EnclaveGatewayStub(self.channel)

    async def acquire(self) -> None:
        lease: pb.Lease = await self.stub.AcquireLease(
            pb.LeaseRequest(lease_id=self.lease_id), timeout=TIMEOUT
        )
        if lease.lease_id != self.lease_id:
            self._drop_ahead()
            self.lease_id, self.used = lease.lease_id, 0

    def presign(self, count: int) -> None:
        """Sign receipts ahead until ``count`` wait, outside the timed windows: each enclave signs on its
        own machine, so here the signing must not take the cores of the custodian being measured."""
        while len(self.ahead) < count:
            self.ahead.append(self._sign_next())

    def _sign_next(self) -> Signed:
        before = (self.seq, self.used, self.prev)
        self.seq += 1
        self.used += 1
        receipt = Receipt(
            deployment=self.deployment,
            instance=self.instance_id,
            lease=self.lease_id,
            model_sha384=self.model_sha384,
            used=self.used,
            seq=self.seq,
            prev=self.prev,
        )
        signed = sign_receipt(receipt, self.key)
        self.prev = receipt.digest()
        message = pb.UsageReport(
            lease_id=self.lease_id,
            seq=self.seq,
            used=self.used,
            receipt=pb.Receipt(body=signed.body, signature=signed.signature),
        )
        return Signed(before, message)

    def _drop_ahead(self) -> None:
        """Forget the receipts signed ahead (their lease is gone): the chain goes on from the last sent."""
        if self.ahead:
            self.seq, self.used, self.prev = self.ahead[0].before
            self.ahead.clear()

    async def report(self, *, final: bool = False) -> None:
        """One more unit used: report the next receipt (signed now unless signed ahead)."""
        message = (self.ahead.popleft() if self.ahead else self._sign_next()).message
        message.final = final
        if self.stream is None:
            self.stream = self.stub.ReportStream(None)
        await self.stream.write(message)
        reply = await asyncio.wait_for(self.stream.read(), TIMEOUT)
        if not isinstance(reply, pb.ReportReply) or reply.WhichOneof("outcome") != "lease":
            raise RuntimeError(f"usage report {self.seq} not taken: {reply}")

    async def cycle_lease(self) -> None:
        """Close the lease with a final report and open a new one: one lease grant."""
        await self.report(final=True)
        self.lease_id = ""
        await self.acquire()


@dataclass(frozen=True)
class Load:
    rate: float  # completed calls per second in the window
    latencies: list[float]  # seconds
    # CPU milliseconds per completed call of the server and of this (client) process (_alternate_async).
    server_cpu_ms: float = 0.0
    client_cpu_ms: float = 0.0


async def _closed_loop(
    reporters: list[Reporter], call: Callable[[Reporter], Awaitable[None]], seconds: float
) -> Load:
    """Every reporter calls back to back; calls completed in the window (after a ramp) count."""
    ramp = min(0.25, seconds / 4)
    start = time.perf_counter()
    begin, end = start + ramp, start + seconds
    latencies: list[float] = []

    async def one(reporter: Reporter) -> None:
        while (sent := time.perf_counter()) < end:
            await call(reporter)
            done = time.perf_counter()
            if begin <= done <= end:
                latencies.append(done - sent)

    await asyncio.gather(*(one(r) for r in reporters))
    return Load(len(latencies) / (seconds - ramp), latencies)


async def _open_loop(reporters: list[Reporter], rate: float, seconds: float) -> Load:
    """Reports due at ``rate`` per second in total, round robin; latency counts from when one was due."""
    interval = len(reporters) / rate
    start = time.perf_counter() + 0.01
    end = start + seconds
    latencies: list[float] = []
    completed = 0

    async def one(index: int, reporter: Reporter) -> None:
        nonlocal completed
        due = start + index / rate
        # A report due before the end is sent, unless the end has passed: one that falls behind stops there.
        while due < end and time.perf_counter() < end:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await reporter.report()
            done = time.perf_counter()
            latencies.append(done - due)
            if done <= end:
                completed += 1
            due += interval

    await asyncio.gather(*(one(i, r) for i, r in enumerate(reporters)))
    return Load(completed / seconds, latencies)


def run(bench: Bench) -> list[Row]:
    system = bench.system
    model_sha384 = bytes.fromhex(system.add_model(DIGITS_MODEL, "digits"))
    ca_pem = system.ca.read_bytes()
    count = bench.settings.ledger_instances
    bench.say(f"ledger: enrolling {count} simulated instances")
    for attempt in range(_ATTEMPTS):
        deployment = system.deployment("ledger", "digits", lease_size=LEASE_SIZE)
        instances = [SimInstance(ca_pem, deployment.name, deployment.code) for _ in range(count)]
        try:
            for instance in instances:
                instance.enrol(system.custodian.enrolment, deployment.token)
            break
        except grpc.RpcError as exc:
            if not stale_code(exc) or attempt == _ATTEMPTS - 1:
                raise
    baseline = bench.baseline("ledger").start(mtls=True)
    with stopping(baseline):
        pids = {"plain": baseline.pid, "custos": system.custodian.pid}
        return asyncio.run(
            _measure(bench, instances, deployment.name, model_sha384, baseline.mtls_address, pids)
        )


async def _measure(
    bench: Bench,
    instances: list[SimInstance],
    deployment: str,
    model_sha384: bytes,
    plain_address: str,
    pids: dict[str, int],
) -> list[Row]:
    settings = bench.settings
    host = bench.system.custodian.gateway.rpartition(":")[0]
    custos = [
        Reporter(i.key, i.instance_id, deployment, model_sha384, i.gateway_channel(host)) for i in instances
    ]
    plain_credentials = grpc.ssl_channel_credentials(
        root_certificates=bench.tls.read("server_cert"),
        private_key=bench.tls.read("client_key"),
        certificate_chain=bench.tls.read("client_cert"),
    )
    plain = [
        Reporter(
            # The baseline checks nothing, but the client does the same work: the same receipts.
            i.key,
            i.instance_id,
            deployment,
            model_sha384,
            grpc.aio.secure_channel(
                plain_address,
                plain_credentials,
                options=[("grpc.ssl_target_name_override", SERVER_NAME), *CHANNEL_OPTIONS],
            ),
        )
        for i in instances
    ]
    try:
        for group in (custos, plain):
            await asyncio.gather(*(r.acquire() for r in group))
            await asyncio.gather(*(r.report() for r in group))
        seconds, rounds = settings.ledger_seconds, settings.ledger_rounds
        offered = settings.offered_reports_per_second

        async def report(r: Reporter) -> None:
            await r.report()

        async def grant(r: Reporter) -> None:
            await r.cycle_lease()

        loads: dict[str, dict[str, list[Load]]] = {}
        n = len(instances)
        # Receipts each instance gets signed ahead of a round: enough for the round (a grant's one
        # report, after a new lease, is signed when sent).
        for kind, make, ahead in (
            (
                "saturation",
                lambda g: _closed_loop(g, report, seconds),
                math.ceil(SIGN_AHEAD_RATE * seconds / n),
            ),
            ("offered", lambda g: _open_loop(g, offered, seconds), math.ceil(offered * seconds / n) + 1),
            ("grants", lambda g: _closed_loop(g, grant, seconds), 0),
        ):
            bench.say(f"ledger: {rounds} rounds of {kind}, plain gRPC and custodian")
            groups = {"plain": (plain, pids["plain"]), "custos": (custos, pids["custos"])}
            loads[kind] = await _alternate_async(rounds, make, groups, ahead)
    finally:
        for reporter in (*custos, *plain):
            await reporter.channel.close(None)
    n = len(instances)
    sat, off, grants = loads["saturation"], loads["offered"], loads["grants"]

    def ms(group: list[Load]) -> list[float]:
        return [1000 * v for load in group for v in load.latencies]

    def summary(group: list[Load]) -> dict[str, float]:
        values = ms(group)
        return {
            "median": percentile(values, 50),
            "p95": percentile(values, 95),
            "p99": percentile(values, 99),
            "server_cpu_ms_per_call": percentile([x.server_cpu_ms for x in group], 50),
            "client_cpu_ms_per_call": percentile([x.client_cpu_ms for x in group], 50),
        }

    return [
        Row(NAME, f"usage reports/s, {n} instances back to back", "reports/s", True,
            "plain gRPC mTLS, no ledger", "custodian", [x.rate for x in sat["plain"]],
            [x.rate for x in sat["custos"]],
            Target("subject_at_least", 2000), extra={"latency_ms": {k: summary(v) for k, v in sat.items()}}),
        Row(NAME, f"usage report latency at {offered}/s offered", "ms", False, "plain gRPC mTLS, no ledger",
            "custodian", ms(off["plain"]), ms(off["custos"]), Target("subject_p99_below", 50),
            extra={"achieved_reports_per_s": {k: [x.rate for x in v] for k, v in off.items()},
                   "latency_ms": {k: summary(v) for k, v in off.items()}}),
        Row(NAME, f"lease grants/s (final report + new lease), {n} instances", "grants/s", True,
            "plain gRPC mTLS, no ledger", "custodian", [x.rate for x in grants["plain"]],
            [x.rate for x in grants["custos"]], note="each grant is two calls",
            extra={"latency_ms": {k: summary(v) for k, v in grants.items()}}),
    ]  # fmt: skip


async def _alternate_async(
    rounds: int,
    make: Callable[[list[Reporter]], Awaitable[Load]],
    groups: dict[str, tuple[list[Reporter], int]],
    ahead: int,
) -> dict[str, list[Load]]:
    """``bench._stats.alternate`` for coroutines: each group in turn, every round, with the CPU time its
    server process (``pid``) and this process spent per call; ``ahead`` receipts signed before each."""
    results: dict[str, list[Load]] = {name: [] for name in groups}
    for _ in range(rounds):
        for name, (group, pid) in groups.items():
            for reporter in group:
                reporter.presign(ahead)
            server, client = cpu_seconds(pid), cpu_seconds()
            load = await make(group)
            calls = max(1, len(load.latencies))
            server_ms = 1000 * (cpu_seconds(pid) - server) / calls
            client_ms = 1000 * (cpu_seconds() - client) / calls
            results[name].append(replace(load, server_cpu_ms=server_ms, client_cpu_ms=client_ms))
    return results
