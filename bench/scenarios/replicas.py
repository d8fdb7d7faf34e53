"""6. Replicas: usage reports on SQLite, on PostgreSQL with one custodian replica and with two.

The same load as the ledger scenario's saturation round (``bench.scenarios.ledger``):
simulated instances enrol for real, then report back to back, one signed
receipt per report on one ``ReportStream`` each. It runs against three set-ups
of the custodian, alternating, every round:

- ``sqlite``: the benchmark's own custodian (the embedded default, the baseline);
- ``postgresql-1``: one replica on a PostgreSQL 15 server the benchmark starts
  (durable: fsync on, as a real server runs);
- ``postgresql-2``: two replicas on another database of that server, the
  instances split between them.

Reported: reports per second, the p99 latency at that load, and the CPU time
per report of the custodian processes (all replicas together) and, apart, of
the PostgreSQL server. On two shared cores, two replicas cannot show more
reports per second than one (they share the cores with each other, the
server and the load); the custodian's CPU per report is what predicts how
replicas scale on machines of their own (``docs/scaling.md``). Target: the
PostgreSQL backend costs at most 1.5 times SQLite's custodian CPU per report.
"""

from __future__ import annotations

import asyncio
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench._context import Bench
from bench._processes import cpu_seconds
from bench._sim_enclave import SimInstance
from bench._stats import Row, Target, percentile
from bench.scenarios.ledger import SIGN_AHEAD_RATE, Reporter, _closed_loop
from enclave.attestation.measurement import code_event
from testkit.postgres import Postgres, bin_dir
from testkit.processes import DIGITS_MODEL, Custodian, enclave_manifest, stopping

NAME = "replicas"
LEASE_SIZE = 1_000_000
GRANT = 10**11


@dataclass
class Setup:
    label: str
    replicas: list[Custodian]
    instances: list[SimInstance]
    deployment: str
    sha384: bytes
    database_pids: list[int]

    def reporters(self) -> list[Reporter]:
        """One per instance, on its gateway channel (made inside the event loop that uses it)."""
        host = self.replicas[0].gateway.rpartition(":")[0]
        return [
            Reporter(i.key, i.instance_id, self.deployment, self.sha384, i.gateway_channel(host))
            for i in self.instances
        ]


def _postgres_pids(cluster: Postgres) -> list[int]:
    """The postmaster and every backend it forked (the replicas' connections among them)."""
    postmaster = int((cluster.directory / "data" / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            pids.append(int(stat.parent.name))
    return pids


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:  # a backend that ended meanwhile
            continue
    return total


def _replicas(bench: Bench, cluster: Postgres, count: int, label: str) -> list[Custodian]:
    url = cluster.new_database()
    env = bench.system.env
    replicas = []
    for index in range(count):
        data = bench.work / f"{label}-{index}"
        if index:
            data.mkdir(mode=0o700)
            shutil.copy(bench.work / f"{label}-0" / "master.key", data / "master.key")
        replicas.append(Custodian(data, env, extra_args=["--database", url]).start())
    return replicas


def _instances(bench: Bench, replicas: list[Custodian], label: str) -> tuple[list[SimInstance], str, bytes]:
    """Simulated instances of a new deployment, enrolled round robin with the replicas."""
    first = replicas[0]
    if first is bench.system.custodian:
        ca, sha384 = bench.system.ca, bench.system.add_model(DIGITS_MODEL, "digits")
    else:
        ca = bench.work / f"{label}-custodian-ca.pem"
        ca.write_bytes(first.ca_pem())
        sha384 = str(first.console("model", "add", str(DIGITS_MODEL), "--name", "digits")["sha384"])
    manifest = enclave_manifest(bench.work / f"{label}-enclave.toml", ca, bench.system.env)
    code = code_event()
    name = f"replicas-{label}"
    created = first.console(
        "deployment", "create", name, "--model", "digits", "--manifest", str(manifest),
        "--lease-size", str(LEASE_SIZE),
    )  # fmt: skip
    first.console("grant", name, str(GRANT))
    ca_pem = ca.read_bytes()
    instances = [SimInstance(ca_pem, name, code) for _ in range(bench.settings.ledger_instances)]
    for index, instance in enumerate(instances):
        instance.enrol(replicas[index % len(replicas)].enrolment, str(created["join_token"]))
    return instances, name, bytes.fromhex(sha384)


def run(bench: Bench) -> list[Row]:
    if bin_dir() is None:
        bench.notes.append("replicas: not run, no PostgreSQL (apt-get install postgresql)")
        return []
    cluster = Postgres.start(durable=True)
    started: list[Custodian] = []
    try:
        one = _replicas(bench, cluster, 1, "pg1")
        started += one
        two = _replicas(bench, cluster, 2, "pg2")
        started += two
        with stopping(*started):
            setups = []
            for label, replicas in (
                ("sqlite", [bench.system.custodian]),
                ("postgresql-1", one),
                ("postgresql-2", two),
            ):
                bench.say(f"replicas: enrolling {bench.settings.ledger_instances} instances ({label})")
                instances, deployment, sha384 = _instances(bench, replicas, label)
                database = [] if label == "sqlite" else _postgres_pids(cluster)
                setups.append(Setup(label, replicas, instances, deployment, sha384, database))
            return asyncio.run(_measure(bench, setups))
    finally:
        cluster.close()


@dataclass
class Round:
    rate: float
    latencies: list[float]
    custodian_cpu_ms: float  # per report, every replica together
    database_cpu_ms: float  # per report, the PostgreSQL server


async def _measure(bench: Bench, setups: list[Setup]) -> list[Row]:
    seconds, rounds = bench.settings.ledger_seconds, bench.settings.ledger_rounds
    results: dict[str, list[Round]] = {s.label: [] for s in setups}

    async def report(r: Reporter) -> None:
        await r.report()

    reporters = {setup.label: setup.reporters() for setup in setups}
    try:
        for group in reporters.values():
            await asyncio.gather(*(r.acquire() for r in group))
            await asyncio.gather(*(r.report() for r in group))
        ahead = math.ceil(SIGN_AHEAD_RATE * seconds / bench.settings.ledger_instances)
        bench.say(f"replicas: {rounds} rounds of saturation on sqlite, postgresql-1, postgresql-2")
        for _ in range(rounds):
            for setup in setups:
                for reporter in reporters[setup.label]:
                    reporter.presign(ahead)
                pids = [r.pid for r in setup.replicas]
                custodian, database = _cpu(pids), _cpu(setup.database_pids)
                load = await _closed_loop(reporters[setup.label], report, seconds)
                calls = max(1, len(load.latencies))
                results[setup.label].append(
                    Round(
                        load.rate,
                        load.latencies,
                        1000 * (_cpu(pids) - custodian) / calls,
                        1000 * (_cpu(setup.database_pids) - database) / calls,
                    )
                )
    finally:
        for group in reporters.values():
            for reporter in group:
                await reporter.channel.close(None)
    return _rows(bench, results)


def _ms(group: list[Round]) -> list[float]:
    return [1000 * v for r in group for v in r.latencies]


def _rows(bench: Bench, results: dict[str, list[Round]]) -> list[Row]:
    n = bench.settings.ledger_instances
    sqlite = results["sqlite"]

    def summary(group: list[Round]) -> dict[str, float]:
        ms = _ms(group)
        return {
            "reports_per_s_median": percentile([r.rate for r in group], 50),
            "latency_p99_ms": percentile(ms, 99),
            "custodian_cpu_ms_per_report": percentile([r.custodian_cpu_ms for r in group], 50),
            "database_cpu_ms_per_report": percentile([r.database_cpu_ms for r in group], 50),
        }

    extra = {"by_setup": {label: summary(group) for label, group in results.items()}}
    rows = []
    for label in ("postgresql-1", "postgresql-2"):
        group = results[label]
        rows += [
            Row(NAME, f"usage reports/s, {n} instances back to back, {label}", "reports/s", True,
                "sqlite", label, [r.rate for r in sqlite], [r.rate for r in group], extra=extra),
            Row(NAME, f"usage report latency at saturation, {label}", "ms", False, "sqlite", label,
                _ms(sqlite), _ms(group)),
            Row(NAME, f"custodian CPU per usage report, {label}", "ms", False, "sqlite", label,
                [r.custodian_cpu_ms for r in sqlite], [r.custodian_cpu_ms for r in group],
                Target("ratio_at_most", 1.5),
                note="all replicas together; the PostgreSQL server's own CPU is in extra.by_setup"),
        ]  # fmt: skip
    return rows
