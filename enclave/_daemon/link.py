"""The custodian link: the mutual-TLS session with the custodian's gateway.

After enrolment it fetches the model, acquires the lease, reports usage and
keeps the control stream open:

- usage reports every ``report_interval`` when ``used`` changed, and at once
  when the lease runs low (``want_more``; ``enclave._daemon.lease``), on one
  long-lived ``ReportStream`` (reopened after a failure). The
  reporter pauses only after a report that failed; an answered top-up, with
  or without new units, lets it go on at once. Each report carries
  a receipt signed with the identity key (``enclave.receipts``): ``seq`` 1, 2,
  3, ... per instance, hash-chained to the previous one. Reports go one at a
  time and in order; one that failed is retried unchanged (same receipt), so
  the custodian counts it once, and the next receipt is built only once the
  previous one was answered. Leases the custodian replaced get their final
  count reported before the current one.
- the control stream (``Watch``) applies heartbeats and lease changes to the
  local lease. When it fails or goes silent, the link reconnects with
  exponential backoff and jitter, reports what was served meanwhile, acquires
  the lease again and reopens the stream. Losing the custodian never stops
  the daemon; the lease's offline deadline decides what is served.
- reconnection, ours and the gRPC channel's own, backs off to at most a fifth
  of the offline grace: a restarted custodian gives every active lease a fresh
  grace, and the enclave must be back, with its usage reported, well within
  it, or the lease expires and is charged in full. While the custodian is
  away the log says so once, then rarely (``enclave._daemon.outage``).
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from enclave._daemon.config import DaemonConfig
from enclave._daemon.enrolment import Enrolment, channel_options, gateway_credentials, gateway_of
from enclave._daemon.errors import ProtocolError
from enclave._daemon.lease import Lease, LeaseTerms
from enclave._daemon.measured import MeasuredIdentity
from enclave._daemon.metrics import DaemonMetrics
from enclave._daemon.model_push import PushedModel, receive_model
from enclave._daemon.outage import Outage
from enclave.receipts import GENESIS, Receipt, TokenCounts, sign_receipt
from protos import custos_pb2, custos_pb2_grpc

logger = logging.getLogger(__name__)

# Codes (``Refusal.code``) with which the custodian refuses a report for good; retrying cannot help.
_REPORT_REFUSALS = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED"})


# Codes of a custodian replica that is gone or cannot reach its database: try another one.
_GONE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class _ReportStreamError(Exception):
    """The report stream failed or went silent: the report may or may not have arrived."""


class Backoff:
    """Exponential backoff with jitter: each delay drawn from [d/2, d], d doubling up to ``cap``."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._cap = cap
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not a secret
        self._attempt = 0

    def next(self) -> float:
        delay = min(self._cap, self._initial * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._attempt = 0


def lease_terms(message: custos_pb2.Lease) -> LeaseTerms:
    return LeaseTerms(
        lease_id=message.lease_id,
        limit=message.limit,
        valid_for=float(message.valid_for_seconds),
        suspended=message.suspended,
        deployment_balance=message.deployment_balance,
    )


def reconnect_cap(config: DaemonConfig, offline_grace: float) -> float:
    """The longest wait between two reconnection tries: well under the offline grace."""
    return max(config.reconnect_initial, min(config.reconnect_max, offline_grace / 5))


def heartbeat_silence(valid_for: float) -> float:
    """How long the control stream may stay silent: two heartbeat periods and a second."""
    period = max(1.0, min(5.0, valid_for / 3))
    return 2 * period + 1


class CustodianLink:
    def __init__(
        self,
        config: DaemonConfig,
        identity: MeasuredIdentity,
        enrolment: Enrolment,
        lease: Lease,
        metrics: DaemonMetrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._identity = identity
        self.enrolment = enrolment
        self.lease = lease
        self._metrics = metrics
        self._rng = rng
        self._reconnect_max = reconnect_cap(config, enrolment.offline_grace)
        addresses = config.custodians
        self._replica = addresses.index(enrolment.custodian) if enrolment.custodian in addresses else 0
        self._channel, self._stub = self._open(enrolment.gateway)
        self._outage = Outage(logger, "custodian unreachable")
        lease.topup_size = enrolment.lease_size
        self.model_sha384 = b""
        # One report at a time, in receipt order.
        self._reporting = asyncio.Lock()
        self._pending: tuple[custos_pb2.UsageReport, Receipt] | None = None
        # The receipt chain as the custodian has it: last accepted sequence and its digest.
        self.receipt_seq = 0
        self._receipt_head = GENESIS
        # Units the custodian has been told of (or refused), per lease.
        self._acked: dict[str, int] = {}
        # Whether the last report was refused (as opposed to not reaching the custodian).
        self._refused = False
        # Reports travel on one long-lived stream (ReportStream), reopened after a failure.
        self._report_stream: (
            grpc.aio.StreamStreamCall[custos_pb2.UsageReport, custos_pb2.ReportReply] | None
        ) = None
        self.connected = False
        self._closed = False

    def _open(self, gateway: str) -> tuple[grpc.aio.Channel, custos_pb2_grpc.EnclaveGatewayAsyncStub]:
        # gRPC's channel backs off on its own between connection attempts (up to two minutes by
        # default), and fails calls at once meanwhile: it must come back as soon as ours would.
        backoff_ms = round(self._reconnect_max * 1000)
        channel = grpc.aio.secure_channel(
            gateway,
            gateway_credentials(self._config, self._identity, self.enrolment),
            options=[
                *channel_options(self._config),
                ("grpc.initial_reconnect_backoff_ms", round(self._config.reconnect_initial * 1000)),
                ("grpc.min_reconnect_backoff_ms", round(self._config.reconnect_initial * 1000)),
                ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ],
        )
        return channel, custos_pb2_grpc.EnclaveGatewayStub(channel)

    async def _fail_over(self) -> None:
        """Move to the next of the custodian's replicas, if ``--custodian`` lists several.

        The instance, its lease and its receipt chain are the custodian's, in the ledger every
        replica shares, and its client certificate is from the CA they share: on the new replica
        the link goes on where it stopped (the lease acquired again, then the reports).
        """
        addresses = self._config.custodians
        if len(addresses) < 2:
            return
        self._replica = (self._replica + 1) % len(addresses)
        address = addresses[self._replica]
        try:
            gateway = await gateway_of(self._config, address)
        except grpc.aio.AioRpcError as exc:
            self._outage.failed(f"custodian replica {address}: {exc.code().name}")
            return
        except ProtocolError as exc:
            self._outage.failed(str(exc))
            return
        old, (self._channel, self._stub) = self._channel, self._open(gateway)
        self._drop_report_stream()
        await old.close(None)
        self._metrics.failovers.inc()
        logger.warning("moved to the custodian replica at %s (gateway %s)", address, gateway)

    # --------------------------------------------------------------- calls

    async def fetch_model(self) -> PushedModel:
        pushed = await receive_model(
            self._stub,
            self._identity,
            self.enrolment.instance_id,
            max_model_bytes=self._config.max_model_bytes,
            read_timeout=self._config.call_timeout,
        )
        self.model_sha384 = pushed.sha384
        return pushed

    async def acquire_lease(self) -> None:
        """Open or refresh the lease (usage travels in reports, never here)."""
        request = custos_pb2.LeaseRequest(lease_id=self.lease.lease_id)
        reply = await self._stub.AcquireLease(request, timeout=self._config.call_timeout)
        self.lease.apply(lease_terms(reply))
        self._set_connected(True)
        logger.info(
            "lease %s: limit %d, valid %d s%s",
            reply.lease_id,
            reply.limit,
            reply.valid_for_seconds,
            ", SUSPENDED" if reply.suspended else "",
        )

    async def report(self, *, final: bool = False) -> bool:
        """Send every report that is due, in order; False when one failed (unanswered or refused).

        With ``final``, the last one closes the lease, and True means it was acknowledged.
        """
        async with self._reporting:
            while True:
                if self._pending is None:
                    self._pending = self._next_report(final)
                    if self._pending is None:
                        return True
                report, receipt = self._pending
                if not await self._send(report, receipt):
                    return False
                if final and not report.final and self.lease.lease_id:
                    continue  # what was pending or retired went first; the final report follows
                if report.lease_id != self.lease.lease_id and self.lease.retired:
                    continue
                return True

    def _next_report(self, final: bool) -> tuple[custos_pb2.UsageReport, Receipt] | None:
        """The next report due: a replaced lease's final count first, then the current lease."""
        while self.lease.retired:
            lease_id, used, tokens = self.lease.retired[0]
            if used > self._acked.get(lease_id, 0):
                return self._build(lease_id, used, tokens, want_more=False, final=False)
            self.lease.retired.pop(0)
            self._acked.pop(lease_id, None)
        lease_id, used, tokens = self.lease.lease_id, self.lease.committed, self.lease.tokens
        want_more = self.lease.topup_wanted.is_set() and not final
        if not lease_id or (used == self._acked.get(lease_id, 0) and not want_more and not final):
            return None
        self.lease.topup_wanted.clear()
        if want_more:
            self.lease.topup_requested()
        return self._build(lease_id, used, tokens, want_more=want_more, final=final)

    def _build(
        self, lease_id: str, used: int, tokens: TokenCounts | None, *, want_more: bool, final: bool
    ) -> tuple[custos_pb2.UsageReport, Receipt]:
        receipt = Receipt(
            deployment=self._config.deployment,
            instance=self.enrolment.instance_id,
            lease=lease_id,
            model_sha384=self.model_sha384,
            used=used,
            seq=self.receipt_seq + 1,
            prev=self._receipt_head,
            tokens=tokens,
        )
        signed = sign_receipt(receipt, self._identity.key)
        report = custos_pb2.UsageReport(
            lease_id=lease_id,
            seq=receipt.seq,
            used=used,
            want_more=want_more,
            final=final,
            receipt=custos_pb2.Receipt(body=signed.body, signature=signed.signature),
            prompt_tokens=tokens.prompt if tokens else 0,
            completion_tokens=tokens.completion if tokens else 0,
        )
        return report, receipt

    async def _send(self, report: custos_pb2.UsageReport, receipt: Receipt) -> bool:
        """One report; True when the custodian took it. A refusal is final: the report is dropped."""
        self._refused = False
        try:
            reply = await self._exchange(report)
        except _ReportStreamError as exc:
            self._drop_report_stream()
            self._outage.failed(f"usage report {report.seq}: {exc}")
            return False
        if reply.WhichOneof("outcome") != "lease":
            code, message = reply.refusal.code, reply.refusal.message
            if code not in _REPORT_REFUSALS:
                self._outage.failed(f"usage report {report.seq}: {code}")
                return False
            logger.error(
                "custodian refused usage report %d (used %d): %s: %s", report.seq, report.used, code, message
            )
            self._settle(report)
            if report.want_more:
                self.lease.topup_dropped()  # refused for good: another top-up may be asked for
            self._refused = True
            return False
        self._settle(report)
        self.receipt_seq, self._receipt_head = receipt.seq, receipt.digest()
        self.lease.apply(lease_terms(reply.lease), closed=report.final)
        if report.want_more:
            self.lease.topup_answered()
        self._set_connected(True)
        return True

    async def _exchange(self, report: custos_pb2.UsageReport) -> custos_pb2.ReportReply:
        """Send one report on the report stream (opened when needed) and read its answer."""
        if self._report_stream is None:
            self._report_stream = self._stub.ReportStream(None)  # None: reports are written one by one
        try:
            async with asyncio.timeout(self._config.call_timeout):
                await self._report_stream.write(report)
                reply = await self._report_stream.read()
        except grpc.aio.AioRpcError as exc:
            raise _ReportStreamError(exc.code().name) from None
        except TimeoutError:
            raise _ReportStreamError(f"no answer within {self._config.call_timeout:g} s") from None
        except asyncio.InvalidStateError:  # written after the custodian ended the stream
            raise _ReportStreamError("report stream closed") from None
        if not isinstance(reply, custos_pb2.ReportReply):  # grpc.aio.EOF
            raise _ReportStreamError("report stream closed")
        return reply

    def _drop_report_stream(self) -> None:
        if self._report_stream is not None:
            self._report_stream.cancel()
            self._report_stream = None

    def _settle(self, report: custos_pb2.UsageReport) -> None:
        self._pending = None
        self._acked[report.lease_id] = report.used

    # --------------------------------------------------------------- loops

    async def run(self) -> None:
        """Report usage and watch the control stream until cancelled."""
        await asyncio.gather(self._report_loop(), self._watch_loop())

    async def _report_loop(self) -> None:
        interval = self._config.report_interval
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self.lease.topup_wanted.wait()
            except TimeoutError:
                pass
            if not await self.report():
                # Back off only after a failure: an answer, even one without units, is no reason to wait.
                await asyncio.sleep(interval)
            elif not self.lease.lease_id and self.connected:
                # The custodian says this instance holds no lease (it expired or closed): ask for one.
                try:
                    await self.acquire_lease()
                except grpc.aio.AioRpcError as exc:
                    self._outage.failed(f"no new lease yet: {exc.code().name}")
                    await asyncio.sleep(interval)

    async def _watch_loop(self) -> None:
        backoff = Backoff(self._config.reconnect_initial, self._reconnect_max, self._rng)
        while True:
            try:
                await self._watch(backoff)
                reason = "control stream closed"
            except grpc.aio.AioRpcError as exc:
                reason = exc.code().name
            except TimeoutError:
                reason = "control stream went silent"
            self._set_connected(False)
            self._outage.failed(reason)
            while True:
                await asyncio.sleep(backoff.next())
                try:
                    # The lease first (its grace is running out), then what was served meanwhile.
                    await self.acquire_lease()
                    break
                except grpc.aio.AioRpcError as exc:
                    self._outage.failed(exc.code().name)
                    if exc.code() in _GONE:
                        await self._fail_over()
            await self.report()
            self._outage.over("reconnected to the custodian")

    async def _watch(self, backoff: Backoff) -> None:
        call = self._stub.Watch(custos_pb2.WatchRequest())
        try:
            while True:
                # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancellation that
                # comes as the read completes, and the link would then never stop.
                async with asyncio.timeout(heartbeat_silence(self.lease.valid_for)):
                    event = await call.read()
                if not isinstance(event, custos_pb2.ControlEvent):
                    return  # grpc.aio.EOF: the custodian closed the stream
                backoff.reset()
                self._set_connected(True)
                if event.WhichOneof("event") == "lease":
                    self.lease.apply(lease_terms(event.lease))
                elif event.WhichOneof("event") == "heartbeat":
                    self.lease.heartbeat(float(event.heartbeat.valid_for_seconds), event.heartbeat.suspended)
        finally:
            call.cancel()

    # ------------------------------------------------------------ shutdown

    async def close(self, *, final_report: bool, grace: float | None = None) -> None:
        """Send the final usage report (closing the lease), retried within the shutdown grace."""
        if self._closed:
            return
        self._closed = True
        if final_report and self.lease.lease_id:
            grace = self._config.shutdown_grace if grace is None else grace
            try:
                await asyncio.wait_for(self._final_report(), grace)
            except TimeoutError:
                logger.error("final usage report not acknowledged within %g s", grace)
        await self._channel.close(None)
        self._set_connected(False)

    async def _final_report(self) -> None:
        backoff = Backoff(self._config.reconnect_initial, self._config.reconnect_max, self._rng)
        while True:
            if await self.report(final=True):
                logger.info("final usage report acknowledged (receipt %d)", self.receipt_seq)
                return
            if self._refused:
                return
            await asyncio.sleep(backoff.next())

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._metrics.custodian_connected.set(1 if connected else 0)
