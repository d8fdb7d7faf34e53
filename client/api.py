"""A verified connection to an enclave.

``connect`` does, before any input can be sent:

1. fetch the enclave's TLS certificate without trusting it;
2. appraise the evidence and claims it carries against the manifest (platform,
   code and configuration measurements, custodian CA, allowed model);
3. open a gRPC channel that trusts exactly that certificate (pinned);
4. ask for fresh evidence over a nonce of our own on the pinned channel and
   appraise it again, bound to the same key.

Any failure raises ``VerificationRefusedError`` and nothing is sent.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np
from numpy.typing import NDArray

from client import _status
from client.errors import ClientError, EnclaveUnavailableError, InvalidInputError, VerificationRefusedError
from enclave import identity
from enclave.attestation import Appraisal, ReferenceValues, appraise
from enclave.attestation.sim import SIMULATION_WARNING
from enclave.errors import EnclaveError
from protos import custos_pb2, custos_pb2_grpc

logger = logging.getLogger(__name__)

MAX_INPUT_BYTES = 8 * 1024 * 1024
MAX_MESSAGE_BYTES = 20 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class InferResult:
    top: tuple[Prediction, ...]
    remaining_quota: int
    model_sha384: str
    simulated: bool


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClientError(f"enclave address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def fetch_certificate(address: str, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The enclave's TLS certificate (PEM), read from the handshake without verifying it."""
    host, port = _split_address(address)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate is appraised, then pinned
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=identity.ENCLAVE_TLS_NAME) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        raise EnclaveUnavailableError(f"cannot reach enclave at {address}: {exc}") from exc
    if not der:
        raise VerificationRefusedError("enclave presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode()


def load_manifest(manifest: ReferenceValues | str | Path) -> ReferenceValues:
    if isinstance(manifest, ReferenceValues):
        return manifest
    try:
        return ReferenceValues.from_toml(Path(manifest).read_bytes())
    except OSError as exc:
        raise ClientError(f"cannot read manifest {manifest}: {exc}") from exc
    except EnclaveError as exc:
        raise ClientError(f"manifest {manifest}: {exc}") from exc


class Connection:
    """A pinned, verified channel to one enclave. Use ``connect`` to make one."""

    def __init__(
        self, channel: grpc.Channel, appraisal: Appraisal, certificate_pem: bytes, timeout: float
    ) -> None:
        self._channel = channel
        self._stub = custos_pb2_grpc.InferenceStub(channel)
        self._timeout = timeout
        self.appraisal = appraisal
        self.certificate_pem = certificate_pem

    @property
    def simulated(self) -> bool:
        return self.appraisal.simulated

    @property
    def model_sha384(self) -> str:
        model = self.appraisal.model_sha384
        return model.hex() if model else ""

    def infer_image(self, image: bytes, *, top_k: int = 5) -> InferResult:
        if len(image) > MAX_INPUT_BYTES:
            raise InvalidInputError(f"input is {len(image)} bytes, over the {MAX_INPUT_BYTES}-byte limit")
        return self._infer(custos_pb2.InferRequest(image=image, top_k=top_k))

    def infer_tensor(self, tensor: NDArray[np.float32], *, top_k: int = 5) -> InferResult:
        array = np.ascontiguousarray(tensor, dtype="<f4")
        wire = custos_pb2.Tensor(shape=list(array.shape), float32_data=array.tobytes())
        return self._infer(custos_pb2.InferRequest(tensor=wire, top_k=top_k))

    def status(self) -> custos_pb2.StatusResponse:
        try:
            response: custos_pb2.StatusResponse = self._stub.Status(
                custos_pb2.StatusRequest(), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _status.from_rpc_error(exc) from None
        return response

    def _infer(self, request: custos_pb2.InferRequest) -> InferResult:
        try:
            response: custos_pb2.InferResponse = self._stub.Infer(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise _status.from_rpc_error(exc) from None
        return InferResult(
            top=tuple(Prediction(p.index, p.label, p.score) for p in response.top),
            remaining_quota=response.remaining_quota,
            model_sha384=response.model_sha384,
            simulated=self.simulated,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(
    address: str,
    manifest: ReferenceValues | str | Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    now: datetime.datetime | None = None,
) -> Connection:
    """Verify the enclave at ``address`` against ``manifest`` and return a pinned connection."""
    reference = load_manifest(manifest)
    when = now or datetime.datetime.now(datetime.UTC)
    pem = fetch_certificate(address, timeout=timeout)
    try:
        _, public_key, evidence, claims = identity.read_attested_certificate(pem)
        appraise(
            evidence,
            claims,
            reference,
            now=when,
            nonce=None,
            public_key=public_key,
            purpose="tls",
            require_model=True,
        )
    except EnclaveError as exc:
        raise VerificationRefusedError(f"enclave certificate refused: {exc}") from exc

    channel = grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=pem),
        options=[
            ("grpc.ssl_target_name_override", identity.ENCLAVE_TLS_NAME),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    try:
        appraisal = _challenge(channel, reference, public_key, when, timeout)
    except BaseException:
        channel.close()
        raise
    if appraisal.simulated:
        logger.warning(SIMULATION_WARNING)
    return Connection(channel, appraisal, pem, timeout)


def _challenge(
    channel: grpc.Channel,
    reference: ReferenceValues,
    public_key: bytes,
    now: datetime.datetime,
    timeout: float,
) -> Appraisal:
    nonce = os.urandom(32)
    try:
        response: custos_pb2.AttestResponse = custos_pb2_grpc.InferenceStub(channel).Attest(
            custos_pb2.AttestRequest(nonce=nonce), timeout=timeout
        )
    except grpc.RpcError as exc:
        raise VerificationRefusedError(f"fresh attestation failed: {_status.from_rpc_error(exc)}") from None
    try:
        return appraise(
            response.evidence,
            response.claims,
            reference,
            now=now,
            nonce=nonce,
            public_key=public_key,
            purpose="attest",
            require_model=True,
        )
    except EnclaveError as exc:
        raise VerificationRefusedError(f"fresh evidence refused: {exc}") from exc
