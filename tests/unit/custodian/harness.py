"""The custodian's services over a real ledger (SQLite in a temp dir or PostgreSQL) and a settable clock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from custodian.authority import CertificateAuthority
from custodian.config import CustodianConfig
from custodian.control import ControlBus
from custodian.deployments import Deployments
from custodian.enrolment import Enrolment
from custodian.leases import Leases, LeaseView
from custodian.ledger import InstanceRecord, Ledger, is_postgres_url
from custodian.metering import UsageClaim
from custodian.metrics import CustodianMetrics
from custodian.model_check import ModelInput
from custodian.model_store import ModelStore
from custodian.roster import Roster
from enclave.receipts import TokenCounts
from tests.unit.custodian.fake_enclave import FakeEnclave, sim_manifest


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime(2030, 1, 1, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Custody:
    config: CustodianConfig
    clock: Clock
    ledger: Ledger
    store: ModelStore
    bus: ControlBus
    metrics: CustodianMetrics
    tls_ca: CertificateAuthority
    enclave_ca: CertificateAuthority
    ak_ca: CertificateAuthority
    deployments: Deployments
    leases: Leases
    enrolment: Enrolment
    roster: Roster

    async def upload(self, name: str, data: bytes, *, part: int = 700) -> Any:
        async def parts() -> AsyncIterator[bytes]:
            for i in range(0, len(data), part):
                yield data[i : i + part]

        return await self.store.add(name, parts(), actor="admin")

    async def lend(self, name: str = "d", *, units: int = 0, grace: int = 30, lease_size: int = 100) -> str:
        """A model and a deployment of it under the sim manifest; returns the join token."""
        if not await self.store_has(f"{name}-model"):
            await self.upload(f"{name}-model", os.urandom(3000))
        token = await self.deployments.create(
            name,
            model=f"{name}-model",
            manifest=sim_manifest(self.tls_ca.pem),
            offline_grace_seconds=grace,
            lease_size=lease_size,
        )
        if units:
            await self.deployments.grant(name, units)
        return token

    async def store_has(self, model: str) -> bool:
        return any(m.name == model for m in await self.store.models())

    async def enrol(self, deployment: str, token: str) -> tuple[str, FakeEnclave]:
        """Enrol a fresh fake enclave; returns its instance id and the enclave."""
        enclave = FakeEnclave(self.tls_ca.pem, deployment)
        nonce, _ = await self.enrolment.challenge(deployment)
        request = enclave.enrol_request(nonce, token)
        enrolled = await self.enrolment.enrol(
            deployment, join_token=token, evidence=request.evidence, claims=request.claims, csr=request.csr
        )
        enclave.instance_id = enrolled.instance_id
        async with self.ledger.transaction() as tx:
            record = await tx.deployment(deployment)
            model = await tx.model_by_id(record.model_id) if record else None
        assert model is not None
        enclave.model_sha384 = model.sha384
        return enrolled.instance_id, enclave

    async def caller(self, instance_id: str) -> InstanceRecord:
        """The enrolled instance, as the gateway hands it to ``Leases.report``."""
        async with self.ledger.transaction() as tx:
            instance = await tx.instance(instance_id)
        assert instance is not None
        return instance

    async def report(
        self,
        enclave: FakeEnclave,
        lease_id: str,
        used: int,
        *,
        want_more: bool = False,
        final: bool = False,
        **forged: object,
    ) -> LeaseView:
        """A usage report with the enclave's next receipt (``forged`` changes the receipt's fields)."""
        receipt, signed = enclave.receipt(lease_id, used, **forged)
        claim = UsageClaim(
            lease_id=receipt.lease,
            seq=receipt.seq,
            used=receipt.used,
            want_more=want_more,
            final=final,
            receipt=signed,
            tokens=receipt.tokens or TokenCounts(),
        )
        view = await self.leases.report(await self.caller(enclave.instance_id), claim)
        enclave.accepted(receipt)
        return view


class AnyBytesLoad:
    """A load check that takes any bytes for a model with one tensor input.

    The unit tests of quota, leases and enrolment use random bytes as the model; the real
    check (a child process loading the model in onnxruntime) is tested in test_model_check.py
    and by every integration test, which runs the real server.
    """

    INPUT = ModelInput("input", "float", ("?", "4"), "tensor")

    @classmethod
    async def start(cls) -> AnyBytesLoad:
        return cls()

    async def feed(self, part: bytes) -> None:
        pass

    async def result(self) -> tuple[ModelInput, ...]:
        return (self.INPUT,)

    async def stop(self) -> None:
        pass


@asynccontextmanager
async def custody(
    tmp_path: Path, *, clock: Clock | None = None, database: str | Path | None = None, **config: Any
) -> AsyncIterator[Custody]:
    """The services over the ledger at ``database`` (default: SQLite in ``tmp_path``)."""
    clock = clock or Clock()
    settings = CustodianConfig(data_dir=tmp_path, **config)
    ledger = await Ledger.open(database or tmp_path / "ledger.sqlite3", now=clock)
    try:
        sizes = {"chunk_size": settings.model_chunk_size, "max_bytes": settings.max_model_bytes}
        if database is not None and is_postgres_url(database):
            # Replicas keep the sealed chunks in the database (the shared KEK: test_replica.py).
            store = ModelStore.shared(ledger, os.urandom(32), **sizes, start_check=AnyBytesLoad.start)
        else:
            store = ModelStore.open(tmp_path, ledger, **sizes, start_check=AnyBytesLoad.start)
        bus, metrics = ControlBus(), CustodianMetrics()
        tls_ca = CertificateAuthority.load_or_create(
            tmp_path, "custodian-ca", "test custodian CA", now=clock()
        )
        enclave_ca = CertificateAuthority.load_or_create(
            tmp_path, "enclave-ca", "test enclave CA", now=clock()
        )
        ak_ca = CertificateAuthority.load_or_create(tmp_path, "ak-ca", "test AK CA", now=clock())
        yield Custody(
            config=settings,
            clock=clock,
            ledger=ledger,
            store=store,
            bus=bus,
            metrics=metrics,
            tls_ca=tls_ca,
            enclave_ca=enclave_ca,
            ak_ca=ak_ca,
            deployments=Deployments(
                ledger,
                settings,
                bus,
                metrics,
                custodian_ca_sha256=tls_ca.sha256,
                ak_ca_pem=ak_ca.pem,
            ),
            leases=Leases(ledger, metrics, monotonic=lambda: clock().timestamp()),
            enrolment=Enrolment(
                ledger, enclave_ca, settings, metrics, ak_ca=ak_ca, monotonic=lambda: clock().timestamp()
            ),
            roster=Roster(ledger, bus),
        )
    finally:
        await ledger.close()


def sample(metrics: CustodianMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0
