"""The inference service: ``Infer``, ``Generate``, ``Attest`` and ``Status`` over attested TLS.

``Generate`` (a language model's, token by token) is ``enclave._daemon.generation``'s.

``Infer`` validates the input first (an invalid input costs no quota), then
reserves one unit of the lease, runs the model in an executor, and commits the
unit on success or refunds it on failure. Decoding and evidence, the work a
caller can cause without spending quota, run in bounded pools of their own
(``enclave._daemon.admission``): a flood of them is refused as busy and never
delays the model runs of callers who pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

import grpc

from enclave._daemon import status
from enclave._daemon.admission import BoundedPool, StreamSlots
from enclave._daemon.config import DaemonConfig
from enclave._daemon.errors import (
    BusyError,
    CustodianOfflineError,
    GenerationsBusyError,
    InvalidInputError,
    LeaseRevokedError,
    ModelNotLoadedError,
    QuotaExhaustedError,
    SuspendedError,
    WrongModelKindError,
)
from enclave._daemon.generation import Generation
from enclave._daemon.lease import Lease
from enclave._daemon.measured import MeasuredIdentity
from enclave._daemon.metrics import DaemonMetrics
from enclave._daemon.preprocess import FloatArray, InputLimits, image_to_tensor, tensor_from_wire
from enclave._daemon.prompting import PromptLimits
from enclave._daemon.runtime import ModelRuntime
from enclave._daemon.text_models import LoadedTextModel
from enclave.errors import EnclaveError
from protos import custos_pb2, custos_pb2_grpc

ATTEST_NONCE_SIZES = range(16, 65)
# Scores an answer may carry (the client asks for 1 to 1000 as well).
MAX_TOP_K = 1000

_OUTCOMES: tuple[tuple[type[EnclaveError], str], ...] = (
    (InvalidInputError, "invalid_input"),
    (QuotaExhaustedError, "refused_quota"),
    (LeaseRevokedError, "refused_quota"),
    (SuspendedError, "refused_suspended"),
    (CustodianOfflineError, "refused_offline"),
    (BusyError, "refused_busy"),
    (GenerationsBusyError, "refused_busy"),
)


def _outcome(error: EnclaveError) -> str:
    return next((outcome for kind, outcome in _OUTCOMES if isinstance(error, kind)), "error")


class InferenceService(custos_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        config: DaemonConfig,
        identity: MeasuredIdentity,
        lease: Lease,
        metrics: DaemonMetrics,
        executor: Executor,
        *,
        decoding: BoundedPool,
        attesting: BoundedPool,
        custodian_reachable: Callable[[], bool],
        generating: Executor,
        slots: StreamSlots,
    ) -> None:
        self._config = config
        self._identity = identity
        self._lease = lease
        self._metrics = metrics
        self._executor = executor
        self._decoding = decoding
        self._attesting = attesting
        self._custodian_reachable = custodian_reachable
        self._limits = InputLimits(
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            max_tensor_bytes=config.max_tensor_bytes,
        )
        self._generation = Generation(
            lease,
            metrics,
            generating,
            slots=slots,
            preparing=decoding,
            limits=PromptLimits(
                max_prompt_bytes=config.max_prompt_bytes, max_messages=config.max_chat_messages
            ),
        )
        # One of the two once the model is loaded: a classifier, or a language model.
        self.model: ModelRuntime | None = None
        self.text_model: LoadedTextModel | None = None
        self.served = 0
        self.refused = 0

    async def Infer(  # noqa: N802 -- gRPC method name
        self, request: custos_pb2.InferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> custos_pb2.InferResponse:
        started = time.perf_counter()
        try:
            response = await self._infer(request)
        except EnclaveError as exc:
            self.refused += 1
            self._metrics.count(_outcome(exc))
            await status.abort(context, exc)
        self.served += 1
        self._metrics.count("served")
        self._metrics.latency.observe(time.perf_counter() - started)
        return response

    async def Generate(  # noqa: N802 -- gRPC method name
        self, request: custos_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[custos_pb2.GenerateChunk]:
        # Timed per token (custos_enclave_time_{to_first,per_output}_token_seconds), not per call.
        try:
            model = self.text_model
            if model is None:
                if self.model is not None:
                    raise WrongModelKindError("this enclave serves a classifier: call Infer, not Generate")
                raise ModelNotLoadedError()
            # Closed here, not when collected: a stream the client left settles its lease at once.
            async with contextlib.aclosing(self._generation.stream(model, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except EnclaveError as exc:
            self.refused += 1
            self._metrics.count(_outcome(exc))
            await status.abort(context, exc)
        self.served += 1
        self._metrics.count("served")

    async def _infer(self, request: custos_pb2.InferRequest) -> custos_pb2.InferResponse:
        model = self.model
        if model is None:
            if self.text_model is not None:
                raise WrongModelKindError("this enclave serves a language model: call Generate, not Infer")
            raise ModelNotLoadedError()
        top_k = request.top_k or self._config.default_top_k
        if top_k > MAX_TOP_K:
            raise InvalidInputError(f"top_k must be 1 to {MAX_TOP_K}, got {top_k}")
        tensor = await self._decoding.run(self._prepare, model, request)
        await self._lease.reserve()
        try:
            scores = await asyncio.get_running_loop().run_in_executor(
                self._executor, model.run, tensor, top_k
            )
        except BaseException:
            self._lease.refund()
            raise
        self._lease.commit()
        return custos_pb2.InferResponse(
            top=[custos_pb2.ClassScore(index=s.index, label=s.label, score=s.score) for s in scores],
            remaining_quota=self._lease.remaining + self._lease.deployment_balance,
            model_sha384=model.sha384_hex,
        )

    def _prepare(self, model: ModelRuntime, request: custos_pb2.InferRequest) -> FloatArray:
        kind = request.WhichOneof("input")
        if kind == "image":
            if model.image_spec is None:
                raise InvalidInputError("this model takes tensors, not images")
            return image_to_tensor(request.image, model.image_spec, self._limits)
        if kind == "tensor":
            tensor = request.tensor
            return tensor_from_wire(tensor.shape, tensor.float32_data, model.input_shape, self._limits)
        raise InvalidInputError("request carries no input")

    async def Attest(  # noqa: N802 -- gRPC method name
        self, request: custos_pb2.AttestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> custos_pb2.AttestResponse:
        nonce = request.nonce
        if len(nonce) not in ATTEST_NONCE_SIZES:
            low, high = ATTEST_NONCE_SIZES.start, ATTEST_NONCE_SIZES.stop - 1
            error = InvalidInputError(f"nonce must be {low} to {high} bytes, got {len(nonce)}")
            await status.abort(context, error)
        try:
            evidence, claims = await self._attesting.run(self._identity.attest, "attest", nonce)
        except BusyError as exc:
            await status.abort(context, exc)
        return custos_pb2.AttestResponse(evidence=evidence, claims=claims)

    async def Status(  # noqa: N802 -- gRPC method name
        self, request: custos_pb2.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> custos_pb2.StatusResponse:
        # Anyone who reaches the port may ask: what is served and whether it can serve now, never
        # the lease or the counts (the borrower reads those from --metrics, the custodian from its
        # ledger); lease_limit, lease_used, served and refused stay 0.
        model = self.model or self.text_model
        return custos_pb2.StatusResponse(
            deployment=self._config.deployment,
            platform=self._identity.platform,
            model_loaded=model is not None,
            model_sha384=model.sha384_hex if model is not None else "",
            suspended=self._lease.suspended,
            custodian_reachable=self._custodian_reachable(),
        )
