"""The daemon's life: measure, enrol, load the model, serve, report, stop — or zeroize and start over.

A session measures the code and configuration into a fresh attester, enrols
with the custodian under a new identity key, fetches and opens the model in
memory, measures it, acquires the lease, then serves inference over TLS with a
certificate that carries fresh evidence for its identity key.

``request_stop`` (SIGTERM) stops taking calls, lets those in flight finish,
and sends the final usage report. The session zeroizes instead when the
deployment stays suspended past its offline grace, or when no lease renewal
arrives for the deployment's zeroize-after time: it refuses every call,
sends the final report if the custodian is reachable, stops the inference
server and drops the model session, the identity key and the link (see
docs/protocol.md, Zeroization). The next session enrols again as a new
instance, retrying with backoff while the custodian is unreachable or the
deployment suspended; it serves on the same port with a new certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
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
from enclave._daemon.errors import (
    ConfigError,
    CustodianUnreachableError,
    DeploymentSuspendedError,
    LeaseUnavailableError,
)
from enclave._daemon.inference import InferenceService
from enclave._daemon.lease import Lease
from enclave._daemon.link import Backoff, CustodianLink
from enclave._daemon.measured import MeasuredIdentity, attester_for
from enclave._daemon.metrics import DaemonMetrics, MetricsServer
from enclave._daemon.runtime import ModelRuntime
from enclave.attestation import Attester, MeasurementEvent, measurement
from enclave.identity import attested_certificate, private_key_pem
from protos import custos_pb2_grpc

logger = logging.getLogger(__name__)

# How often the zeroization conditions are checked.
WATCHDOG_INTERVAL = 0.25
# Seconds a zeroizing enclave tries to deliver its final report.
ZEROIZE_REPORT_GRACE = 2.0
# Re-enrolment keeps trying through these; anything else ends the daemon.
_RETRIED = (CustodianUnreachableError, DeploymentSuspendedError, LeaseUnavailableError)


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
        new_attester: Callable[[], Attester] | None = None,
    ) -> None:
        self.config = config
        self.metrics = DaemonMetrics()
        self._clock = clock
        self._new_attester = new_attester or (lambda: attester_for(attester.platform))
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self._executor = ThreadPoolExecutor(config.inference_workers, thread_name_prefix="inference")
        self._port = 0
        self._code_event: MeasurementEvent | None = None
        self._metrics_address: str | None = None
        # The current session's state; replaced wholesale when the daemon enrols again.
        self.identity = MeasuredIdentity(attester, config.deployment)
        self.lease = Lease(topup_wait=config.topup_wait, clock=clock)
        self.service = self._service()
        self.link: CustodianLink | None = None
        self.sessions = 0
        self.metrics.track_lease(lambda: self.lease.limit, lambda: self.lease.committed)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``request_stop``; raise a ``DaemonError`` when the enclave cannot serve."""
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._executor.shutdown, wait=False, cancel_futures=True)
            self._start_metrics(stack)
            while not await self._session():
                logger.warning("enrolling again as a new instance")

    # -------------------------------------------------------------- session

    async def _session(self) -> bool:
        """One identity's life; True when the daemon should stop, False after zeroizing."""
        async with contextlib.AsyncExitStack() as stack:
            start = asyncio.ensure_future(self._start(stack))
            stop = asyncio.ensure_future(self._stop.wait())
            stack.callback(stop.cancel)
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():
                logger.info("stopped before serving")
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
                return True
            server = start.result()
            assert self.link is not None
            link_run = asyncio.ensure_future(self.link.run())
            watchdog = asyncio.ensure_future(self._watchdog())
            await asyncio.wait({link_run, stop, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if link_run.done():
                link_run.result()  # the link never ends on its own: this raises what broke it
            if not stop.done():
                await self._zeroize(server, link_run, watchdog.result())
                return False
            watchdog.cancel()
            logger.info("stopping: no new calls, %g s for those in flight", self.config.shutdown_grace)
            await server.stop(self.config.shutdown_grace)
            await _cancel(link_run)
            await self.link.close(final_report=True)
            return True

    async def _start(self, stack: contextlib.AsyncExitStack) -> grpc.aio.Server:
        if self.sessions == 0:
            return await self._serve(stack)
        backoff = Backoff(self.config.reconnect_initial, self.config.reconnect_max)
        while True:
            try:
                return await self._serve(stack)
            except _RETRIED as exc:
                logger.warning("cannot enrol again yet: %s", exc)
            if self.link is not None:
                await self.link.close(final_report=False)
            await asyncio.sleep(backoff.next())

    async def _serve(self, stack: contextlib.AsyncExitStack) -> grpc.aio.Server:
        config = self.config
        if self.sessions > 0:
            self._fresh_state()
        self.sessions += 1
        # The code running is the code measured at start, whatever the files on disk say later.
        if self._code_event is None:
            self._code_event = await asyncio.to_thread(measurement.code_event)
        self.identity.measure(self._code_event)
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
        host, _ = parse_address(config.listen, what="--listen")
        address = f"{host}:{self._port}" if self._port else config.listen
        try:
            port = server.add_secure_port(address, await self._tls_credentials())
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(f"cannot listen on {address}")
        self._port = port
        await server.start()
        stack.push_async_callback(server.stop, None)

        ready = Ready(
            inference=f"{host}:{port}",
            metrics=self._metrics_address,
            instance_id=enrolment.instance_id,
            model_sha384=pushed.sha384.hex(),
            deployment=config.deployment,
        )
        logger.info("serving on %s as instance %s", ready.inference, ready.instance_id)
        if self._on_ready is not None:
            self._on_ready(ready)
        return server

    def _fresh_state(self) -> None:
        """A new identity key, attester, lease and service; only a TPM PCR's log so far carries over."""
        self.identity = self.identity.successor(self._new_attester())
        self.lease = Lease(topup_wait=self.config.topup_wait, clock=self._clock)
        self.service = self._service()
        self.link = None

    def _service(self) -> InferenceService:
        return InferenceService(
            self.config,
            self.identity,
            self.lease,
            self.metrics,
            self._executor,
            custodian_reachable=lambda: self.link is not None and self.link.connected,
        )

    # ---------------------------------------------------------- zeroization

    async def _watchdog(self) -> str:
        """Returns the reason once the session must zeroize."""
        assert self.link is not None
        zeroize_after = float(self.link.enrolment.zeroize_after)
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            lease = self.lease
            if lease.suspended and lease.suspended_for > lease.valid_for:
                return "suspended"
            if zeroize_after > 0 and lease.silent_for > zeroize_after:
                return "offline"

    async def _zeroize(self, server: grpc.aio.Server, link_run: asyncio.Future[None], reason: str) -> None:
        assert self.link is not None
        logger.warning(
            "zeroizing (%s): dropping the model and the keys of instance %s",
            "deployment suspended past its grace" if reason == "suspended" else "no lease renewal",
            self.link.enrolment.instance_id,
        )
        self.lease.close()
        await server.stop(0)
        await _cancel(link_run)
        # Suspended, the custodian is there: close the lease so its remainder returns. Offline, it is
        # not: the lease expires there, charged in full (the declared worst case).
        await self.link.close(final_report=self.link.connected, grace=ZEROIZE_REPORT_GRACE)
        self.service.model = None
        self._fresh_state()
        gc.collect()
        self.metrics.model_loaded.set(0)
        self.metrics.zeroizations.labels(reason=reason).inc()

    # ------------------------------------------------------------- helpers

    def _start_metrics(self, stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        if config.metrics_listen is None:
            return
        host, port = parse_address(config.metrics_listen, what="--metrics")
        try:
            server = MetricsServer(self.metrics, host, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {config.metrics_listen}: {exc}") from None
        stack.callback(server.close)
        self._metrics_address = f"{host}:{server.port}"

    async def _tls_credentials(self) -> grpc.ServerCredentials:
        """A certificate for the identity key carrying fresh evidence, its log including the model."""
        evidence, claims = await asyncio.to_thread(self.identity.attest, "tls", os.urandom(32))
        certificate = attested_certificate(
            self.identity.key, evidence, claims, now=datetime.datetime.now(datetime.UTC)
        )
        return grpc.ssl_server_credentials(
            [(private_key_pem(self.identity.key), certificate.public_bytes(serialization.Encoding.PEM))]
        )


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
