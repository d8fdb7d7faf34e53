"""The daemon's life: measure, enrol, load the model, serve, report, stop.

``Daemon.run`` measures the code and configuration into the attester, enrols
with the custodian, fetches and opens the model in memory, measures it,
acquires the lease, then serves inference over TLS with a certificate that
carries fresh evidence for its identity key. ``request_stop`` (SIGTERM) stops
taking calls, lets those in flight finish, and sends the final usage report.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives import serialization

from enclave._daemon.config import DaemonConfig, custodian_ca_der, parse_address
from enclave._daemon.enrolment import enrol
from enclave._daemon.errors import ConfigError, LeaseUnavailableError
from enclave._daemon.inference import InferenceService
from enclave._daemon.lease import Lease
from enclave._daemon.link import CustodianLink
from enclave._daemon.measured import MeasuredIdentity
from enclave._daemon.metrics import DaemonMetrics, MetricsServer
from enclave._daemon.runtime import ModelRuntime
from enclave.attestation import Attester, measurement
from enclave.identity import attested_certificate, private_key_pem
from protos import custos_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ready:
    """Where the daemon serves, once it does (what ``--ready-file`` holds)."""

    inference: str
    metrics: str | None
    instance_id: str
    model_sha384: str
    deployment: str

    def to_json(self) -> dict[str, str | None]:
        return {
            "inference": self.inference,
            "metrics": self.metrics,
            "instance_id": self.instance_id,
            "model_sha384": self.model_sha384,
        }


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        attester: Attester,
        *,
        on_ready: Callable[[Ready], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = DaemonMetrics()
        self.identity = MeasuredIdentity(attester, config.deployment)
        self.lease = Lease(topup_wait=config.topup_wait, clock=clock)
        self.metrics.track_lease(lambda: self.lease.limit, lambda: self.lease.committed)
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self._executor = ThreadPoolExecutor(config.inference_workers, thread_name_prefix="inference")
        self.service = InferenceService(
            config,
            self.identity,
            self.lease,
            self.metrics,
            self._executor,
            custodian_reachable=lambda: self.link is not None and self.link.connected,
        )
        self.link: CustodianLink | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``request_stop``; raise a ``DaemonError`` when the enclave cannot serve."""
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._executor.shutdown, wait=False, cancel_futures=True)
            start = asyncio.ensure_future(self._start(stack))
            stop = asyncio.ensure_future(self._stop.wait())
            stack.callback(stop.cancel)
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():
                logger.info("stopped before serving")
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
                return
            server = start.result()
            assert self.link is not None
            link_run = asyncio.ensure_future(self.link.run())
            await asyncio.wait({link_run, stop}, return_when=asyncio.FIRST_COMPLETED)
            if link_run.done():
                link_run.result()  # the link never ends on its own: this raises what broke it
            logger.info("stopping: no new calls, %g s for those in flight", self.config.shutdown_grace)
            await server.stop(self.config.shutdown_grace)
            link_run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link_run
            await self.link.close(final_report=True)

    async def _start(self, stack: contextlib.AsyncExitStack) -> grpc.aio.Server:
        config = self.config
        self.identity.measure(measurement.code_event())
        self.identity.measure(measurement.config_event(custodian_ca_der(config.custodian_ca_pem)))
        enrolment = await enrol(config, self.identity)
        self.link = link = CustodianLink(config, self.identity, enrolment, self.lease, self.metrics)
        stack.push_async_callback(link.close, final_report=False)

        pushed = await link.fetch_model()
        try:
            runtime = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                lambda: ModelRuntime(
                    bytes(pushed.plaintext), sha384=pushed.sha384, intra_op_threads=config.intra_op_threads
                ),
            )
        finally:
            pushed.wipe()
        self.identity.measure(measurement.model_event(pushed.sha384))
        self.service.model = runtime
        self.metrics.model_loaded.set(1)
        try:
            await link.acquire_lease()
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            raise LeaseUnavailableError(f"custodian granted no lease ({reason})") from None

        server = grpc.aio.server(options=config.grpc_options)
        custos_pb2_grpc.add_InferenceServicer_to_server(self.service, server)
        try:
            port = server.add_secure_port(config.listen, await self._tls_credentials())
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(f"cannot listen on {config.listen}")
        await server.start()
        stack.push_async_callback(server.stop, None)
        host, _ = parse_address(config.listen, what="--listen")

        metrics_address = None
        if config.metrics_listen is not None:
            metrics_host, metrics_port = parse_address(config.metrics_listen, what="--metrics")
            try:
                metrics_server = MetricsServer(self.metrics, metrics_host, metrics_port)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {config.metrics_listen}: {exc}") from None
            stack.callback(metrics_server.close)
            metrics_address = f"{metrics_host}:{metrics_server.port}"

        ready = Ready(
            inference=f"{host}:{port}",
            metrics=metrics_address,
            instance_id=enrolment.instance_id,
            model_sha384=pushed.sha384.hex(),
            deployment=config.deployment,
        )
        logger.info("serving on %s", ready.inference)
        if self._on_ready is not None:
            self._on_ready(ready)
        return server

    async def _tls_credentials(self) -> grpc.ServerCredentials:
        """A certificate for the identity key carrying fresh evidence, its log including the model."""
        evidence, claims = await asyncio.to_thread(self.identity.attest, "tls", os.urandom(32))
        certificate = attested_certificate(
            self.identity.key, evidence, claims, now=datetime.datetime.now(datetime.UTC)
        )
        return grpc.ssl_server_credentials(
            [(private_key_pem(self.identity.key), certificate.public_bytes(serialization.Encoding.PEM))]
        )
