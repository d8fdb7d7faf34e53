"""A verified connection to an enclave.

``connect`` does, before any input can be sent:

1. fetch the enclave's TLS certificate from the handshake, without trusting it;
2. check the certificate's validity period, then appraise the evidence and
   claims it carries against the manifest (platform, registers, code and
   configuration measurements, custodian CA, allowed model), bound to the
   certificate's key;
3. open a gRPC channel that trusts exactly that certificate (pinned);
4. ask for fresh evidence over a random nonce of our own on the pinned channel
   and appraise it again, bound to the same key.

A failure in steps 2-4 raises ``VerificationRefusedError`` naming what did not
check out (also when the pinned channel meets another certificate than the one
appraised); an enclave that cannot be reached raises
``EnclaveUnavailableError`` (``EnclaveNotListeningError`` when nothing listens
at its address). Either way nothing was sent.
"""

from __future__ import annotations

import datetime
import functools
import logging
import operator
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc
import numpy as np
from numpy.typing import ArrayLike

from client import _status, _transport
from client.errors import (
    ClientError,
    EnclaveChangedError,
    InvalidInputError,
    ModelChangedError,
    VerificationRefusedError,
)
from client.generation import Generation, Message, generate_request
from enclave import identity
from enclave.attestation import Appraisal, Evidence, ReferenceValues, appraise
from enclave.attestation.certificates import check_validity
from enclave.attestation.manifest import MAX_MANIFEST_BYTES
from enclave.collateral.amd_kds import AmdKds
from enclave.collateral.cache import CollateralCache
from enclave.errors import EnclaveError
from protos import custos_pb2, custos_pb2_grpc

# The caller's own collateral for a piece of evidence (serialized), or None.
CollateralSource = Callable[[bytes], Mapping[str, bytes] | None]

logger = logging.getLogger(__name__)

MAX_INPUT_BYTES = 8 * 1024 * 1024
MAX_MESSAGE_BYTES = 20 * 1024 * 1024
# Room for the request's other fields; a larger tensor could not be sent in one message.
MAX_TENSOR_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
MAX_TOP_K = 1000
DEFAULT_TIMEOUT = 30.0
NONCE_BYTES = 32


@dataclass(frozen=True)
class Prediction:
    """One of the top classes: its index in the model's output, its label, its score."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class InferResult:
    top: tuple[Prediction, ...]
    # Inferences left to the enclave's deployment, as far as the enclave knows.
    remaining_quota: int
    model_sha384: str
    simulated: bool


def read_image(path: str | os.PathLike[str]) -> bytes:
    """Read an input file for ``Connection.infer_image``: a regular file of 1 byte to 8 MiB."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(f"{path} is not a regular file")
            data = file.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    _check_image(data, str(path))
    return data


def load_manifest(manifest: ReferenceValues | str | os.PathLike[str]) -> ReferenceValues:
    """The reference values to verify against: given as is, or read from a TOML file."""
    if isinstance(manifest, ReferenceValues):
        return manifest
    try:
        with open(manifest, "rb") as file:
            text = file.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ClientError(f"cannot read manifest {manifest}: {exc.strerror or exc}") from exc
    try:
        return ReferenceValues.from_toml(text)
    except EnclaveError as exc:
        raise ClientError(f"manifest {manifest}: {exc}") from exc


class Connection:
    """A pinned, verified channel to one enclave. Use ``connect`` to make one.

    Thread-safe: calls may be made from several threads at once.
    """

    def __init__(
        self,
        address: str,
        channel: grpc.Channel,
        appraisal: Appraisal,
        certificate_pem: bytes,
        timeout: float,
    ) -> None:
        self.address = address
        self._channel = channel
        self._stub = custos_pb2_grpc.InferenceStub(channel)
        self._timeout = timeout
        # The appraisal of the fresh evidence (purpose "attest", our nonce).
        self.appraisal = appraisal
        # Checked against every answer; the appraisal is frozen, so found in its log once.
        model = appraisal.model_sha384
        self.model_sha384 = model.hex() if model else ""
        self.certificate_pem = certificate_pem
        self._closed = False

    @property
    def simulated(self) -> bool:
        return self.appraisal.simulated

    @property
    def deployment(self) -> str:
        """The deployment the enclave serves, as its verified claims say."""
        return self.appraisal.claims.deployment

    @property
    def key_sha256(self) -> str:
        """SHA-256 of the enclave's attested public key (SubjectPublicKeyInfo)."""
        return identity.key_fingerprint(self.appraisal.claims.public_key)

    def infer_image(self, image: bytes, *, top_k: int = 5) -> InferResult:
        """Classify an encoded image (PNG or JPEG), sent as is; the enclave decodes it."""
        _check_image(image, "input")
        return self._infer(custos_pb2.InferRequest(image=image, top_k=_check_top_k(top_k)))

    def infer_tensor(self, tensor: ArrayLike, *, top_k: int = 5) -> InferResult:
        """Classify a tensor already shaped for the model, sent as little-endian float32."""
        try:
            array = np.ascontiguousarray(tensor, dtype="<f4")
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"input is not a float32 tensor: {exc}") from exc
        if array.nbytes > MAX_TENSOR_BYTES:
            raise InvalidInputError(f"tensor is {array.nbytes} bytes, over the {MAX_TENSOR_BYTES}-byte limit")
        wire = custos_pb2.Tensor(shape=list(array.shape), float32_data=array.tobytes())
        return self._infer(custos_pb2.InferRequest(tensor=wire, top_k=_check_top_k(top_k)))

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Generation:
        """A language model's answer to a raw ``prompt`` or to chat ``messages``, as it streams.

        ``messages``: ``ChatMessage`` or ``{"role": ..., "content": ...}``, roles system, user,
        assistant. ``max_tokens`` 0: up to the end of the model's context. ``temperature``
        (0 to 2, 0 greedy), ``top_p`` and ``seed`` left out take the model's defaults (1, 1, a
        fresh seed). ``timeout`` bounds the whole answer (default: ten times the connection's,
        at least 10 minutes). Returns an iterator of ``Delta``; ``usage`` once it has ended.
        """
        self._check_open()
        request = generate_request(
            prompt,
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
        )
        deadline = timeout if timeout is not None else max(600.0, 10 * self._timeout)
        if not deadline > 0:
            raise ClientError("timeout must be positive")
        call = self._stub.Generate(request, timeout=deadline)
        return Generation(call, model_sha384=self.model_sha384, explain=self._explain)

    def status(self) -> custos_pb2.StatusResponse:
        """What the enclave tells anyone: deployment, platform, model, suspended, custodian reachable."""
        self._check_open()
        try:
            response: custos_pb2.StatusResponse = self._stub.Status(
                custos_pb2.StatusRequest(), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise self._explain(exc) from None
        return response

    def _infer(self, request: custos_pb2.InferRequest) -> InferResult:
        self._check_open()
        try:
            response: custos_pb2.InferResponse = self._stub.Infer(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise self._explain(exc) from None
        if response.model_sha384 != self.model_sha384:
            raise ModelChangedError(
                f"enclave answered with model {response.model_sha384 or '(none)'}, but attested model "
                f"{self.model_sha384}; connect again to verify the model it serves now"
            )
        return InferResult(
            top=tuple(Prediction(p.index, p.label, p.score) for p in response.top),
            remaining_quota=response.remaining_quota,
            model_sha384=response.model_sha384,
            simulated=self.simulated,
        )

    def _explain(self, error: grpc.RpcError) -> ClientError:
        """The client error for a failed call; for UNAVAILABLE, whether the enclave itself said it."""
        mapped = _status.from_rpc_error(error)
        if not _status.is_unavailable(error):
            return mapped
        return _transport.why_unavailable(self.address, self.certificate_pem, timeout=self._timeout) or mapped

    def _check_open(self) -> None:
        if self._closed:
            raise ClientError(f"the connection to {self.address} is closed")

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(
    address: str,
    manifest: ReferenceValues | str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    now: datetime.datetime | None = None,
    collateral: CollateralSource | None = None,
    amd_kds: str | None = None,
) -> Connection:
    """Verify the enclave at ``address`` (HOST:PORT) against ``manifest`` and return a pinned connection.

    ``now`` (timezone-aware) is the time the certificate and evidence are checked
    at; the current time by default. ``collateral`` gives the caller's own copy of
    the platform's collateral for a piece of evidence (Intel's, for tdx and sgx:
    ``enclave.collateral.intel.IntelCollateral.for_evidence``); the verifier uses
    it where it is fresher than what the evidence carries. ``amd_kds`` (a base
    URL, e.g. ``enclave.collateral.amd_kds.DEFAULT_KDS_URL``): SEV-SNP evidence is
    checked with AMD's CRL fetched from there, and the VCEK and chain it lacks;
    without it, revocation is checked only when the evidence carries the CRL.
    """
    if not timeout > 0:
        raise ClientError("timeout must be positive")
    reference = load_manifest(manifest)
    when = now or datetime.datetime.now(datetime.UTC)
    try:
        kds = AmdKds(amd_kds, cache=CollateralCache(None)) if amd_kds is not None else None
    except ValueError as exc:
        raise ClientError(f"amd_kds: {exc}") from None
    if reference.platform == "sev-snp" and kds is not None:
        collateral = functools.partial(_amd_collateral, kds)  # AMD collateral serves SEV-SNP only
    pem = _transport.fetch_certificate(address, timeout=timeout)
    try:
        certificate, public_key, evidence, claims = identity.read_attested_certificate(pem)
        check_validity(certificate, when, "enclave certificate")
        appraise(
            evidence,
            claims,
            reference,
            now=when,
            nonce=None,
            public_key=public_key,
            purpose="tls",
            require_model=True,
            collateral=collateral(evidence) if collateral else None,
        )
    except EnclaveError as exc:
        raise VerificationRefusedError(f"enclave certificate refused: {exc}") from exc

    channel = grpc.secure_channel(
        _transport.grpc_target(address),
        grpc.ssl_channel_credentials(root_certificates=pem),
        options=[
            ("grpc.ssl_target_name_override", identity.ENCLAVE_TLS_NAME),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    try:
        appraisal = _challenge(channel, reference, public_key, when, timeout, address, pem, collateral)
    except BaseException:
        channel.close()
        raise
    # appraise() has warned already when the platform is simulated.
    logger.info(
        "verified enclave at %s of deployment %r: platform %s%s, key sha256 %s, model %s",
        address,
        appraisal.claims.deployment,
        appraisal.platform.platform,
        " (SIMULATED)" if appraisal.simulated else "",
        identity.key_fingerprint(public_key),
        appraisal.model_sha384.hex() if appraisal.model_sha384 else "(none)",
    )
    return Connection(address, channel, appraisal, pem, timeout)


def _challenge(
    channel: grpc.Channel,
    reference: ReferenceValues,
    public_key: bytes,
    now: datetime.datetime,
    timeout: float,
    address: str,
    pinned_pem: bytes,
    collateral: CollateralSource | None,
) -> Appraisal:
    """Fresh evidence over our nonce, on the pinned channel, for the certificate's key."""
    nonce = os.urandom(NONCE_BYTES)
    try:
        response: custos_pb2.AttestResponse = custos_pb2_grpc.InferenceStub(channel).Attest(
            custos_pb2.AttestRequest(nonce=nonce), timeout=timeout
        )
    except grpc.RpcError as exc:
        error = _status.from_rpc_error(exc)
        why = None
        if _status.is_unavailable(exc):
            why = _transport.why_unavailable(address, pinned_pem, timeout=timeout)
        if isinstance(why, EnclaveChangedError):
            raise VerificationRefusedError(str(why)) from None
        if why is not None:
            raise why from None
        raise VerificationRefusedError(f"fresh attestation failed: {error}") from None
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
            collateral=collateral(response.evidence) if collateral else None,
        )
    except EnclaveError as exc:
        raise VerificationRefusedError(f"fresh evidence refused: {exc}") from exc


def _amd_collateral(kds: AmdKds, evidence: bytes) -> Mapping[str, bytes]:
    """The AMD collateral SEV-SNP ``evidence`` needs, fetched (blocking)."""
    return kds.collateral_for(Evidence.from_bytes(evidence))


def _check_image(data: bytes, what: str) -> None:
    if not data:
        raise InvalidInputError(f"{what} is empty")
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidInputError(f"{what} is over the {MAX_INPUT_BYTES}-byte limit")


def _check_top_k(top_k: int) -> int:
    try:
        k = operator.index(top_k)
    except TypeError:
        k = 0
    if not 1 <= k <= MAX_TOP_K:
        raise InvalidInputError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
    return k
