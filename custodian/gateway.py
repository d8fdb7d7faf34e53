"""The enclave gateway: the gRPC face of enrolment, model push, leases and the control stream.

One servicer serves both custodian listeners. ``GetChallenge`` and ``Enrol``
need only TLS; every other call needs the client certificate issued at
enrolment, so it succeeds on the mutual-TLS listener alone. The handlers only
translate between the wire and the domain; errors become status codes in
``custodian._status``.

What one instance may make the custodian do is bounded here
(``custodian.throttle``): ``FetchModel`` a few times, then once a minute (each
push sends the whole model and writes an audit entry), and a few ``Watch`` and
``ReportStream`` streams open at once. Past a bound the call is answered
``RESOURCE_EXHAUSTED`` before any work, and the enclave retries with backoff.
"""

# ruff: noqa: N802 - gRPC method names are the wire contract's.

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from custodian._status import status_of
from custodian.control import ControlBus, heartbeat_interval
from custodian.deployments import Deployments
from custodian.enrolment import CredentialChallenge, Enrolled, Enrolment
from custodian.errors import BusyError, CustodianError, RefusedError
from custodian.leases import Leases, LeaseView
from custodian.ledger import InstanceRecord
from custodian.metering import UsageClaim
from custodian.metrics import CustodianMetrics
from custodian.model_store import ModelStore
from custodian.throttle import Rate, StreamSlots
from enclave.envelope import SealedChunk
from enclave.identity import public_key_der
from enclave.receipts import SignedReceipt, TokenCounts
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# FetchModel per instance: this many at once (a start and a retry or two), then one a minute.
FETCH_BURST = 3
FETCH_PER_SECOND = 1 / 60
# Watch and ReportStream streams one instance may hold open at once, each: one in use, and room
# for streams a lost connection left open until the server notices.
MAX_STREAMS_PER_INSTANCE = 4


def _usage_claim(request: pb.UsageReport) -> UsageClaim:
    receipt = request.receipt if request.HasField("receipt") else None
    return UsageClaim(
        lease_id=request.lease_id,
        seq=request.seq,
        used=request.used,
        want_more=request.want_more,
        final=request.final,
        receipt=SignedReceipt(receipt.body, receipt.signature) if receipt else None,
        tokens=TokenCounts(request.prompt_tokens, request.completion_tokens),
    )


def lease_message(view: LeaseView) -> pb.Lease:
    return pb.Lease(
        lease_id=view.lease_id,
        limit=view.limit,
        valid_for_seconds=view.valid_for_seconds,
        suspended=view.suspended,
        deployment_balance=view.deployment_balance,
    )


class Gateway(pb_grpc.EnclaveGatewayServicer):
    def __init__(
        self,
        *,
        enrolment: Enrolment,
        leases: Leases,
        deployments: Deployments,
        store: ModelStore,
        bus: ControlBus,
        metrics: CustodianMetrics,
        mtls_port: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._enrolment = enrolment
        self._leases = leases
        self._deployments = deployments
        self._store = store
        self._bus = bus
        self._metrics = metrics
        self._mtls_port = mtls_port
        # Among replicas, this one's name (HOST:PORT of its enrolment listener), set once it listens.
        self.replica = ""
        # Authenticated callers by client certificate (CN and PEM): see ``_caller``.
        self._callers: dict[tuple[bytes, bytes], InstanceRecord] = {}
        self._fetches = Rate(burst=FETCH_BURST, per_second=FETCH_PER_SECOND, clock=monotonic)
        self._watches = StreamSlots("Watch", MAX_STREAMS_PER_INSTANCE)
        self._report_streams = StreamSlots("ReportStream", MAX_STREAMS_PER_INSTANCE)

    async def GetChallenge(self, request: pb.ChallengeRequest, context: Context) -> pb.Challenge:
        nonce, ttl = await self._enrolment.challenge(request.deployment)
        return pb.Challenge(nonce=nonce, expires_in_seconds=ttl, mtls_port=self._mtls_port)

    async def Enrol(self, request: pb.EnrolRequest, context: Context) -> pb.Enrolment:
        enrolled = await self._enrolment.enrol(
            request.deployment,
            join_token=request.join_token,
            evidence=request.evidence,
            claims=request.claims,
            csr=request.csr,
            tpm_ek_public=request.tpm_ek_public,
            tpm_ek_certificate=request.tpm_ek_certificate,
            tpm_ek_chain=request.tpm_ek_chain,
            source=_source(context),
        )
        if isinstance(enrolled, CredentialChallenge):
            return pb.Enrolment(
                credential=pb.CredentialChallenge(
                    challenge_id=enrolled.challenge_id,
                    credential_blob=enrolled.credential_blob,
                    encrypted_secret=enrolled.encrypted_secret,
                )
            )
        return self._enrolment_message(enrolled)

    async def ActivateCredential(
        self, request: pb.ActivateCredentialRequest, context: Context
    ) -> pb.Enrolment:
        enrolled = await self._enrolment.activate(
            request.challenge_id, request.secret, source=_source(context)
        )
        return self._enrolment_message(enrolled)

    def _enrolment_message(self, enrolled: Enrolled) -> pb.Enrolment:
        return pb.Enrolment(
            instance_id=enrolled.instance_id,
            certificate=enrolled.certificate_pem,
            enclave_ca=enrolled.enclave_ca_pem,
            offline_grace_seconds=enrolled.offline_grace_seconds,
            lease_size=enrolled.lease_size,
            mtls_port=self._mtls_port,
            zeroize_after_seconds=enrolled.zeroize_after_seconds,
            ak_certificate=enrolled.ak_certificate_pem,
        )

    async def FetchModel(
        self, request: pb.FetchModelRequest, context: Context
    ) -> AsyncIterator[pb.ModelPart]:
        instance = await self._caller(context)
        if self._fetches.take(instance.instance_id) is None:
            raise BusyError(
                f"instance {instance.instance_id} fetched the model {FETCH_BURST} times lately;"
                " try again in a minute"
            )
        model = await self._deployments.release_model(instance)
        header = pb.ModelHeader(
            model_id=model.model_id,
            name=model.name,
            plaintext_sha384=model.sha384,
            plaintext_size=model.size,
            chunk_size=model.chunk_size,
            chunk_count=model.chunk_count,
            wrapped_key=self._store.wrap_for(model, instance.public_key, instance.instance_id),
        )
        async with contextlib.aclosing(self._store.chunks(model)) as chunks:
            # The sealed file opens and checks out before anything is sent.
            first = await anext(chunks)
            yield pb.ModelPart(header=header)
            yield self._part(first)
            async for chunk in chunks:
                yield self._part(chunk)
        self._metrics.model_pushes.inc()
        logger.info("model %s pushed to instance %s", model.name, instance.instance_id)

    def _part(self, chunk: SealedChunk) -> pb.ModelPart:
        self._metrics.model_bytes_pushed.inc(len(chunk.ciphertext))
        return pb.ModelPart(
            chunk=pb.ModelChunk(index=chunk.index, final=chunk.final, ciphertext=chunk.ciphertext)
        )

    async def AcquireLease(self, request: pb.LeaseRequest, context: Context) -> pb.Lease:
        instance = await self._caller(context)
        return lease_message(await self._leases.acquire(instance.instance_id))

    async def ReportUsage(self, request: pb.UsageReport, context: Context) -> pb.Lease:
        instance = await self._caller(context)
        return lease_message(await self._leases.report(instance, _usage_claim(request)))

    async def ReportStream(
        self, requests: AsyncIterator[pb.UsageReport], context: Context
    ) -> AsyncIterator[pb.ReportReply]:
        """``ReportUsage`` for every report on the stream, in order; refusals are answered in-band."""
        instance = await self._caller(context)
        with self._report_streams.hold(instance.instance_id):
            async for request in requests:
                try:
                    view = await self._leases.report(instance, _usage_claim(request))
                except CustodianError as exc:
                    code, details = status_of(exc)
                    if code is grpc.StatusCode.INTERNAL:
                        raise  # not the report's fault: the stream ends, the report is sent again
                    # Answered in-band, past the interceptor's logging: said here, as it says the rest.
                    logger.info("ReportStream report refused: %s %s", code.name, details)
                    yield pb.ReportReply(refusal=pb.Refusal(code=code.name, message=details))
                else:
                    yield pb.ReportReply(lease=lease_message(view))

    async def Watch(self, request: pb.WatchRequest, context: Context) -> AsyncIterator[pb.ControlEvent]:
        instance = await self._caller(context)
        with (
            self._watches.hold(instance.instance_id),
            self._bus.subscribe(instance.instance_id, instance.deployment) as subscription,
        ):
            view = await self._leases.touch(instance.instance_id, replica=self.replica)
            yield _heartbeat(view)
            while True:
                changed = await subscription.wait(heartbeat_interval(view.valid_for_seconds))
                view = await self._leases.touch(instance.instance_id, replica=self.replica)
                if changed:
                    self._metrics.control_pushes.inc()
                    yield pb.ControlEvent(lease=lease_message(view))
                else:
                    yield _heartbeat(view)

    async def _caller(self, context: Context) -> InstanceRecord:
        """The enrolled instance behind the call's client certificate.

        The answer is kept per certificate: an instance's id, deployment and key never change
        once enrolled (a zeroized enclave enrols again as a new instance, with a new certificate),
        so a certificate that authenticated once names the same instance for as long as the
        ledger holds it (the ledger never removes an instance; none is revoked). The kept
        record's ``last_seen`` and ``last_seq`` go stale; the handlers read those in their own
        transactions.
        """
        auth = context.auth_context()
        names, pems = list(auth.get("x509_common_name", ())), list(auth.get("x509_pem_cert", ()))
        if not names or not pems:
            raise RefusedError(
                "this call needs the client certificate from enrolment, on the mutual-TLS port"
            )
        key = (names[0], pems[0])
        known = self._callers.get(key)
        if known is not None:
            return known
        public = x509.load_pem_x509_certificate(pems[0]).public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise RefusedError("client certificate key is not an EC key")
        instance = await self._enrolment.authenticate(names[0].decode(), public_key_der(public))
        if len(self._callers) >= _MAX_CALLERS:
            self._callers.clear()
        self._callers[key] = instance
        return instance


# Certificates whose instance is kept (about a kilobyte each); the cache starts over when full.
_MAX_CALLERS = 4096


def _source(context: Context) -> str:
    """The caller's address without its port (``ipv4:10.0.0.1``): one key per host for rate limits."""
    peer = context.peer() or "unknown"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and host not in ("ipv4", "ipv6") else peer


def _heartbeat(view: LeaseView) -> pb.ControlEvent:
    return pb.ControlEvent(
        heartbeat=pb.Heartbeat(valid_for_seconds=view.valid_for_seconds, suspended=view.suspended)
    )
