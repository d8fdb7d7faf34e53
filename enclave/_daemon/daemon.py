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

Each session binds its inference listener before it enrols
(``enclave._daemon.listener``): a port it cannot have costs no enrolment and
no lease. A lease, once opened, is settled with a final report on every way
out of the session the daemon sees (stop, error, zeroization while the
custodian is there), so a failure after it opened is not charged in full.
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

from enclave._daemon.admission import BoundedPool, StreamSlots
from enclave._daemon.config import DaemonConfig, custodian_ca_der, parse_address
from enclave._daemon.enrolment import enrol
from enclave._daemon.errors import (
    ConfigError,
    CustodianUnreachableError,
    DeploymentSuspendedError,
    LeaseUnavailableError,
    ListenError,
)
from enclave._daemon.inference import InferenceService
from enclave._daemon.lease import Lease
from enclave._daemon.link import Backoff, CustodianLink
from enclave._daemon.listener import InferenceListener
from enclave._daemon.measured import MeasuredIdentity, attester_for
from enclave._daemon.metrics import DaemonMetrics, MetricsServer
from enclave._daemon.model_push import PushedModel
from enclave._daemon.outage import Outage
from enclave._daemon.runtime import ModelRuntime
from enclave._daemon.text_models import LoadedTextModel, TextModelLoader, default_loader
from enclave.attestation import Attester, MeasurementEvent, measurement
from enclave.identity import attested_certificate, private_key_pem

logger = logging.getLogger(__name__)

# How often the zeroization conditions are checked.
WATCHDOG_INTERVAL = 0.25
# Seconds a zeroizing enclave tries to deliver its final report.
ZEROIZE_REPORT_GRACE = 2.0
# Seconds a new session waits for the port of the previous one to be free again.
REBIND_WAIT = 5.0
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
        text_models: TextModelLoader | None = None,
    ) -> None:
        """``text_models``: how language models are recognised and loaded (``enclave.llm.loader``'s
        by default); a test gives a double here."""
        self.config = config
        self._text_models = text_models
        self.metrics = DaemonMetrics()
        self._clock = clock
        self._new_attester = new_attester or (lambda: attester_for(attester.platform))
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self._executor = ThreadPoolExecutor(config.inference_workers, thread_name_prefix="inference")
        self._decoding = BoundedPool("decode", workers=config.decode_workers, waiting=config.waiting_per_pool)
        self._attesting = BoundedPool(
            "attest", workers=config.attest_workers, waiting=config.waiting_per_pool
        )
        # One thread per generation running: each holds its thread only while computing a token.
        self._generating = ThreadPoolExecutor(config.generation_streams, thread_name_prefix="generate")
        self._slots = StreamSlots(running=config.generation_streams, waiting=config.generation_waiting)
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
        self.metrics.track_streams(
            lambda: self._slots.active, lambda: self._slots.admitted - self._slots.active
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``request_stop``; raise a ``DaemonError`` when the enclave cannot serve."""
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._executor.shutdown, wait=False, cancel_futures=True)
            stack.callback(self._generating.shutdown, wait=False, cancel_futures=True)
            stack.callback(self._decoding.shutdown)
            stack.callback(self._attesting.shutdown)
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
                # A load still running in its thread closes what it loads itself (it sees the stop).
                self._drop_models()
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
            self._drop_models()
            return True

    async def _start(self, stack: contextlib.AsyncExitStack) -> InferenceListener:
        # Bound before enrolling: a port this daemon cannot have must not cost an enrolment or a lease.
        listener = await self._bind()
        stack.push_async_callback(listener.stop, None)
        if self.sessions == 0:
            await self._serve(stack, listener)
            return listener
        backoff = Backoff(self.config.reconnect_initial, self.config.reconnect_max)
        waiting = Outage(logger, "cannot enrol again yet")
        while True:
            # Each attempt's link is its own: a failed one is undone before the next.
            attempt = contextlib.AsyncExitStack()
            try:
                await self._serve(attempt, listener)
            except _RETRIED as exc:
                waiting.failed(str(exc))
                await attempt.aclose()
            except BaseException:
                await attempt.aclose()
                raise
            else:
                stack.push_async_callback(attempt.aclose)
                return listener
            await asyncio.sleep(backoff.next())

    async def _serve(self, stack: contextlib.AsyncExitStack, listener: InferenceListener) -> None:
        config = self.config
        if self.sessions > 0:
            self._fresh_state()
        self.sessions += 1
        listener.serve(self.service)
        # The code running is the code measured at start, whatever the files on disk say later.
        if self._code_event is None:
            self._code_event = await asyncio.to_thread(measurement.code_event)
        self.identity.measure(self._code_event)
        self.identity.measure(measurement.config_event(custodian_ca_der(config.custodian_ca_pem)))
        enrolment = await enrol(config, self.identity)
        self.link = link = CustodianLink(config, self.identity, enrolment, self.lease, self.metrics)
        # Whatever ends this session settles its lease, if it holds one and the custodian is there.
        stack.push_async_callback(link.close, final_report=True, grace=ZEROIZE_REPORT_GRACE)

        pushed = await link.fetch_model()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load_model, pushed)
        finally:
            pushed.wipe()
        self.identity.measure(measurement.model_event(pushed.sha384))
        self.metrics.model_loaded.set(1)
        try:
            await link.acquire_lease()
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            raise LeaseUnavailableError(f"custodian granted no lease ({reason})") from None

        await listener.start(*await self._tls_identity())

        ready = Ready(
            inference=listener.address,
            metrics=self._metrics_address,
            instance_id=enrolment.instance_id,
            model_sha384=pushed.sha384.hex(),
            deployment=config.deployment,
        )
        logger.info("serving on %s as instance %s", ready.inference, ready.instance_id)
        if self._on_ready is not None:
            self._on_ready(ready)

    def _load_model(self, pushed: PushedModel) -> None:
        """Build the model from memory (blocking): a language model (which keeps the plaintext and
        zeroes it when closed) or a classifier (onnxruntime copies it; the caller wipes it)."""
        if self._text_models is None:
            self._text_models = default_loader()
        threads = self.config.intra_op_threads
        if self._text_models.recognises(pushed.plaintext):
            model = self._text_models.load(pushed.hand_over(), threads)
            logger.info("language model loaded: context of %d tokens", model.context_length)
            self.service.text_model = LoadedTextModel(model, pushed.sha384)
            self.lease.count_tokens()
            if self._stop.is_set():  # stopped while loading: nothing will serve or close it
                self._drop_models()
        else:
            self.service.model = ModelRuntime(
                pushed.plaintext, sha384=pushed.sha384, intra_op_threads=threads
            )

    def _drop_models(self) -> None:
        """Forget the session's models; a language model's weights are zeroed now, not when collected."""
        if self.service.text_model is not None:
            self.service.text_model.model.close()
        self.service.model = None
        self.service.text_model = None

    async def _bind(self) -> InferenceListener:
        """The inference listener; after the first session, on the port the daemon served on."""
        if not self._port:
            listener = InferenceListener(self.config, self.config.listen)
            self._port = listener.port
            return listener
        host, _ = parse_address(self.config.listen, what="--listen")
        deadline = self._clock() + REBIND_WAIT
        while True:
            try:
                return InferenceListener(self.config, f"{host}:{self._port}")
            except ListenError:
                # gRPC closes a stopped server's socket a moment after stop() returns.
                if self._clock() > deadline:
                    raise
            await asyncio.sleep(WATCHDOG_INTERVAL / 5)

    def _fresh_state(self) -> None:
        """A new identity key, attester, lease and service; only a TPM PCR's log so far carries over."""
        self._drop_models()
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
            decoding=self._decoding,
            attesting=self._attesting,
            custodian_reachable=lambda: self.link is not None and self.link.connected,
            generating=self._generating,
            slots=self._slots,
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

    async def _zeroize(self, server: InferenceListener, link_run: asyncio.Future[None], reason: str) -> None:
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

    async def _tls_identity(self) -> tuple[bytes, bytes]:
        """The identity key and a certificate for it carrying fresh evidence, its log including the model."""
        evidence, claims = await asyncio.to_thread(self.identity.attest, "tls", os.urandom(32))
        certificate = attested_certificate(
            self.identity.key, evidence, claims, now=datetime.datetime.now(datetime.UTC)
        )
        return private_key_pem(self.identity.key), certificate.public_bytes(serialization.Encoding.PEM)


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
