"""The running custodian: the data directory, its listeners and the background sweeper.

Data directory (0700, files 0600, all owned by the custodian's user: ``data_dir``
checks it before anything in it is used), created on first start:

    custodian.lock          held while a custodian serves this directory
    custodian-ca.key/.pem   TLS CA: the custodian's server certificates; enclaves pin it
    enclave-ca.key/.pem     enclave CA: client certificates of enrolled instances
    ak-ca.key/.pem          AK CA: certificates of activated TPM attestation keys
    admin-ca.key/.pem       admin CA: client certificates for the admin TCP listener
    kek                     key-encryption key of the models' data keys
    ledger.sqlite3          the ledger (WAL)
    models/                 sealed models
    master.key              with --database (replicas on PostgreSQL), instead of the CA keys, kek,
                            ledger and models, which the database holds (the keys wrapped by this one)
    admin.sock              admin API (0600)
    console.sock            one-time login links of the web console (0600; with --console)
    endpoints.json          where it listens, written once it serves, removed when it stops
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket as socket_module
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
import grpc.aio
from prometheus_client import start_http_server

from custodian import data_dir, replica
from custodian._status import StatusInterceptor
from custodian.admin import Admin
from custodian.admin_access import AdminAccess
from custodian.audit_service import AuditLogService
from custodian.audit_stream import LedgerAudit
from custodian.authority import CUSTODIAN_TLS_NAME, CertificateAuthority
from custodian.challenges import Challenges
from custodian.collateral import CollateralSource, CustodianCollateral
from custodian.config import Address, CustodianConfig
from custodian.control import ControlBus
from custodian.deployments import Deployments
from custodian.enrolment import Enrolment
from custodian.errors import ConfigError
from custodian.gateway import Gateway
from custodian.leases import Leases
from custodian.ledger import Ledger
from custodian.metrics import CustodianMetrics
from custodian.model_store import ModelStore
from custodian.roster import Roster
from custodian.web.evidence_book import EvidenceBook
from custodian.web.listener import ConsoleListener
from custodian.web.refusal_counts import RefusalCounts
from custodian.web.views import ConsoleServices
from protos import custos_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from custodian._control_postgres import ControlListener

logger = logging.getLogger(__name__)

# Longest unix socket path the kernel accepts (sun_path is 108 bytes with its NUL).
_MAX_SOCKET_PATH = 107
# Admin uploads arrive in pieces; this bounds one piece, not the model.
_ADMIN_MAX_MESSAGE = 8 << 20


@dataclass(frozen=True)
class Endpoints:
    """Where the running custodian listens (actual ports, also when configured as 0)."""

    enrolment: Address
    gateway: Address
    metrics: Address | None
    admin_socket: Path
    custodian_ca_sha256: str
    admin: Address | None = None
    console: Address | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "enrolment": str(self.enrolment),
            "gateway": str(self.gateway),
            "metrics": str(self.metrics) if self.metrics else None,
            "admin_socket": str(self.admin_socket),
            "custodian_ca_sha256": self.custodian_ca_sha256,
            "admin": str(self.admin) if self.admin else None,
            "console": f"http://{self.console}" if self.console else None,
        }


class CustodianServer:
    def __init__(self) -> None:
        self._lock: IO[bytes] | None = None
        self._ledger: Ledger | None = None
        self._servers: list[grpc.aio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._listener: ControlListener | None = None
        self._http: WSGIServer | None = None
        self._console: ConsoleListener | None = None
        self._socket: Path | None = None
        self._endpoints_file: Path | None = None
        self._stopped = asyncio.Event()
        self.metrics = CustodianMetrics()
        self.endpoints: Endpoints | None = None
        self.custodian_ca_pem = b""

    @classmethod
    async def start(
        cls,
        config: CustodianConfig,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        collateral: CollateralSource | None = None,
        owner_uid: int | None = None,
    ) -> CustodianServer:
        """Open the data directory and start every listener; stops again cleanly if any step fails.

        ``owner_uid``: the user the data directory must belong to (default: the effective user).
        """
        server = cls()
        try:
            await server._start(config, now, collateral, owner_uid)
        except BaseException:
            await server.stop()
            raise
        return server

    async def _start(
        self,
        config: CustodianConfig,
        now: Callable[[], datetime],
        collateral: CollateralSource | None,
        owner_uid: int | None,
    ) -> None:
        data = config.data_dir
        data_dir.prepare(data, uid=owner_uid)
        self._lock = _lock(data / "custodian.lock")
        chunk_size, max_bytes = config.model_chunk_size, config.max_model_bytes
        if config.database is None:
            tls_ca = CertificateAuthority.load_or_create(
                data, "custodian-ca", "Custos custodian CA", now=now()
            )
            enclave_ca = CertificateAuthority.load_or_create(
                data, "enclave-ca", "Custos enclave CA", now=now()
            )
            ak_ca = CertificateAuthority.load_or_create(data, "ak-ca", "Custos TPM AK CA", now=now())
            admin_ca = CertificateAuthority.load_or_create(data, "admin-ca", "Custos admin CA", now=now())
            # SQLite gives the -wal and -shm files the mode of the database file.
            data_dir.create_private(data / "ledger.sqlite3")
            ledger = self._ledger = await Ledger.open(data / "ledger.sqlite3", now=now)
            store = ModelStore.open(data, ledger, chunk_size=chunk_size, max_bytes=max_bytes)
            challenges = None  # keys of this process's own
        else:
            ledger = self._ledger = await Ledger.open(config.database, now=now)
            keys = await replica.shared_keys(ledger, config.master_key_path, now=now())
            tls_ca, enclave_ca, ak_ca, admin_ca = keys.tls_ca, keys.enclave_ca, keys.ak_ca, keys.admin_ca
            store = ModelStore.shared(ledger, keys.kek, chunk_size=chunk_size, max_bytes=max_bytes)
            # Enrolment may begin on one replica and end on another (a load balancer between).
            challenges = Challenges.shared(keys.kek, ttl_seconds=config.nonce_ttl_seconds)
        self.custodian_ca_pem = tls_ca.pem
        await store.remove_orphans()

        bus = ControlBus()
        self.metrics.watch_streams.set_function(lambda: bus.streams)
        if config.database is not None:
            from custodian._control_postgres import ControlListener  # imports asyncpg: replicas only

            self._listener = ControlListener(config.database, bus)
            self._listener.start()
        if collateral is None:
            own = CustodianCollateral.open(
                data,
                self.metrics,
                pccs_url=config.pccs_url,
                collateral_dir=config.collateral_dir,
                amd_kds_url=config.amd_kds,
            )
            collateral = own.for_evidence
        enrolment = Enrolment(
            ledger,
            enclave_ca,
            config,
            self.metrics,
            collateral=collateral,
            ak_ca=ak_ca,
            challenges=challenges,
        )
        leases = Leases(ledger, self.metrics)
        resumed = await leases.resume()
        if resumed:
            logger.info("%d active lease(s) get a fresh grace from now", resumed)
        deployments = Deployments(
            ledger,
            config,
            bus,
            self.metrics,
            custodian_ca_sha256=tls_ca.sha256,
            ak_ca_pem=ak_ca.pem,
        )

        gateway = self._server(config.max_message_bytes)
        identity = tls_ca.server_identity(CUSTODIAN_TLS_NAME, now=now())
        pair = [(identity.key_pem, identity.chain_pem)]
        enrolment_port = _bind(gateway, str(config.listen), grpc.ssl_server_credentials(pair))
        gateway_port = _bind(
            gateway,
            str(config.gateway_listen),
            grpc.ssl_server_credentials(pair, root_certificates=enclave_ca.pem, require_client_auth=True),
        )
        servicer = Gateway(
            enrolment=enrolment,
            leases=leases,
            deployments=deployments,
            store=store,
            bus=bus,
            metrics=self.metrics,
            mtls_port=gateway_port,
        )
        # Among replicas, each is named by its enrolment listener (what enclaves are given).
        replica_name = "" if config.database is None else _replica_name(config.listen, enrolment_port)
        servicer.replica = replica_name
        pb_grpc.add_EnclaveGatewayServicer_to_server(servicer, gateway)

        admin = self._server(_ADMIN_MAX_MESSAGE)
        admin_port = None
        if config.admin_listen is not None:
            admin_port = _bind(
                admin,
                str(config.admin_listen),
                grpc.ssl_server_credentials(pair, root_certificates=admin_ca.pem, require_client_auth=True),
            )
        socket = config.admin_socket
        if len(os.fsencode(socket.resolve())) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"admin socket path {socket} is too long for a unix socket; use a shorter data dir"
            )
        socket.unlink(missing_ok=True)
        _bind(admin, f"unix:{socket.resolve()}", None)
        self._socket = socket
        socket.chmod(0o600)
        roster = Roster(ledger, bus, replica=replica_name)
        pb_grpc.add_AdminServicer_to_server(
            Admin(
                store=store,
                deployments=deployments,
                roster=roster,
                access=AdminAccess(ledger, admin_ca, tls_ca.pem),
                custodian_ca_pem=tls_ca.pem,
                socket=str(socket),
            ),
            admin,
        )
        pb_grpc.add_AuditLogServicer_to_server(AuditLogService(LedgerAudit(ledger)), admin)

        metrics = None
        if config.metrics_listen is not None:
            try:
                self._http, _ = start_http_server(
                    config.metrics_listen.port, config.metrics_listen.host, registry=self.metrics.registry
                )
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {config.metrics_listen}: {exc.strerror}") from exc
            metrics = replace(config.metrics_listen, port=self._http.server_port)
        for server in self._servers:
            await server.start()
        if config.console_listen is not None:
            book = EvidenceBook()
            enrolment.on_admitted = book.record
            refusals = RefusalCounts(self.metrics, now)
            services = ConsoleServices(
                deployments, roster, store, ledger, self.metrics, data / "collateral", book, refusals
            )
            self._console = await ConsoleListener.start(
                services, config.console_listen, data / "console.sock", now=now
            )
        self._sweeper = asyncio.create_task(
            _sweep(config.sweep_interval_seconds, ledger, leases, enrolment, deployments, self.metrics)
        )
        self.endpoints = Endpoints(
            enrolment=replace(config.listen, port=enrolment_port),
            gateway=replace(config.gateway_listen, port=gateway_port),
            metrics=metrics,
            admin_socket=socket,
            custodian_ca_sha256=tls_ca.sha256,
            admin=replace(config.admin_listen, port=admin_port)
            if config.admin_listen and admin_port
            else None,
            console=self._console.address if self._console else None,
        )
        self._endpoints_file = data / "endpoints.json"
        _write_atomically(self._endpoints_file, json.dumps(self.endpoints.to_json(), indent=2) + "\n")
        logger.info("enrolment listening on %s (TLS)", self.endpoints.enrolment)
        logger.info("gateway listening on %s (mutual TLS)", self.endpoints.gateway)
        logger.info("admin API on unix:%s", socket)
        if self.endpoints.admin is not None:
            logger.info("admin API on %s (mutual TLS, admin certificates)", self.endpoints.admin)
        if metrics is not None:
            logger.info("metrics on http://%s/metrics", metrics)
        if self._console is not None:
            logger.info("web console on http://%s (log in: custodian console login)", self._console.address)

    def _server(self, max_message: int) -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=[StatusInterceptor(self.metrics)],
            options=[("grpc.max_receive_message_length", max_message), ("grpc.so_reuseport", 0)],
        )
        self._servers.append(server)
        return server

    async def wait(self) -> None:
        """Until ``stop`` is called."""
        await self._stopped.wait()

    async def stop(self, grace: float = 1.0) -> None:
        if self._endpoints_file is not None:
            self._endpoints_file.unlink(missing_ok=True)
            self._endpoints_file = None
        if self._console is not None:
            await self._console.stop()
            self._console = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for server in self._servers:
            await server.stop(grace)
        self._servers.clear()
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)
            self._socket = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._ledger is not None:
            await self._ledger.close()
            self._ledger = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._stopped.set()


def _lock(path: os.PathLike[str]) -> IO[bytes]:
    # Held open (and locked) for the server's lifetime.
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    handle = os.fdopen(os.open(path, flags, data_dir.PRIVATE_FILE), "ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another custodian is already serving {os.path.dirname(path)}") from None
    return handle


def _replica_name(listen: Address, port: int) -> str:
    host = listen.host if listen.host not in ("0.0.0.0", "::", "") else socket_module.gethostname()  # noqa: S104
    return str(Address(host, port))


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    data_dir.write_private(partial, text.encode())
    os.replace(partial, path)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from exc


async def _sweep(
    interval: float,
    ledger: Ledger,
    leases: Leases,
    enrolment: Enrolment,
    deployments: Deployments,
    metrics: CustodianMetrics,
) -> None:
    """Expire unrefreshed leases, purge stale challenges and refresh the deployment gauges, forever."""

    async def refresh_gauges() -> None:
        metrics.observe_deployments(await deployments.usage())

    async def expire_and_purge() -> None:
        # Run once among replicas: whichever holds the ledger's singleton lock (SQLite: always us).
        if await ledger.runs_singletons():
            await leases.expire_due()
            await enrolment.purge_challenges()

    jobs = (
        ("expiring leases and purging challenges", expire_and_purge),
        ("refreshing deployment gauges", refresh_gauges),
    )
    while True:
        await asyncio.sleep(interval)
        for what, job in jobs:  # independent: one failing job must not starve the others
            try:
                await job()
            except Exception:
                logger.exception("%s failed; retrying at the next sweep", what)
