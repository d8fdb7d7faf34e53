"""1. Inference: the same model served three ways, latency at concurrency 1 and throughput at 32.

- ``onnxruntime``: the model called in this process (the same decoding, a
  thread pool of the enclave's size); the floor.
- ``plain gRPC``: ``bench._baseline``, a TLS gRPC server running onnxruntime
  on the same model with the same messages; what a user would otherwise deploy.
- ``Custos``: a real ``enclave serve`` process that enrolled with the custodian
  and was pushed the model, metering every call (lease, usage reports,
  metrics), reached through ``client.connect`` (verified, pinned, warm).

Digits goes in as a PNG (the enclave decodes it), the ResNet-18-sized network
as a [1, 3, 224, 224] tensor. Each round runs the three ways in turn (A B C A B
C ...); latencies are pooled over the rounds, throughput is one sample per
round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import numpy as np

from bench import _load
from bench._context import Bench
from bench._plain_model import INFERENCE_WORKERS, PlainModel
from bench._stats import Row, Target, alternate, flatten, percentile
from bench._tls import SERVER_NAME
from bench.models.resnet import build as resnet_build
from client import Connection, connect
from protos import custos_pb2, custos_pb2_grpc
from testkit.processes import DIGITS_MODEL, DIGITS_SAMPLES, stopping

NAME = "inference"
MAX_MESSAGE_BYTES = 20 << 20  # client.api.MAX_MESSAGE_BYTES, the same on the plain client
WAYS = ("onnxruntime", "plain_grpc", "custos")
LARGE_LEASE_WAY = "custos_large_lease"


@dataclass(frozen=True)
class ModelCase:
    name: str
    path: Callable[[], Path]
    request: Callable[[], custos_pb2.InferRequest]
    latency_target: float
    # Also measure throughput with a second enclave whose deployment has a large lease: with the
    # default lease (100 units) the enclave stops for a top-up every 100 calls, which a fast model shows.
    lease_diagnostic: bool = False


DIAGNOSTIC_LEASE = 100_000


_DIGIT_PNG = (DIGITS_SAMPLES / "digit-3.png").read_bytes()


def _digit_request() -> custos_pb2.InferRequest:
    return custos_pb2.InferRequest(image=_DIGIT_PNG, top_k=5)


_RESNET_INPUT = np.random.default_rng(1).standard_normal(resnet_build.INPUT_SHAPE, dtype=np.float32)


def _tensor_request() -> custos_pb2.InferRequest:
    # What Connection.infer_tensor puts on the wire, built anew for each call as it does.
    array = np.ascontiguousarray(_RESNET_INPUT, dtype="<f4")
    wire = custos_pb2.Tensor(shape=list(array.shape), float32_data=array.tobytes())
    return custos_pb2.InferRequest(tensor=wire, top_k=5)


CASES = (
    ModelCase("digits", lambda: DIGITS_MODEL, _digit_request, latency_target=1.25, lease_diagnostic=True),
    ModelCase("resnet18", resnet_build.build, _tensor_request, latency_target=1.10),
)


def run(bench: Bench) -> list[Row]:
    rows: list[Row] = []
    for case in CASES:
        rows += _run_case(bench, case)
    return rows


def _run_case(bench: Bench, case: ModelCase) -> list[Row]:
    settings = bench.settings
    system = bench.system
    path = case.path()
    bench.say(f"inference/{case.name}: adding the model to the custodian, starting enclave and baseline")
    system.add_model(path, case.name)
    baseline = bench.baseline(case.name).start(model=path)
    with stopping(baseline), contextlib.ExitStack() as stack:
        enclave, deployment = system.serving_enclave(f"infer-{case.name}", case.name)
        stack.callback(enclave.stop)
        ways = _Ways(bench, case, path, baseline.address, enclave.address, deployment.end_user_manifest)
        stack.callback(ways.close)
        if case.lease_diagnostic:
            large, large_deployment = system.serving_enclave(
                f"infer-{case.name}-lease", case.name, lease_size=DIAGNOSTIC_LEASE
            )
            stack.callback(large.stop)
            ways.add_custos(LARGE_LEASE_WAY, large.address, large_deployment.end_user_manifest)
        calls = ways.calls
        for call in calls.values():
            _load.latencies(call, 5)
            _load.throughput(call, settings.concurrency, 0.3)
        bench.say(f"inference/{case.name}: {settings.inference_rounds} rounds of {', '.join(WAYS)}")
        n = settings.latency_calls[case.name]
        lat = alternate(
            settings.inference_rounds,
            [(way, partial(_load.latencies, call, n)) for way, call in calls.items() if way in WAYS],
        )
        load = partial(
            _load.throughput, concurrency=settings.concurrency, seconds=settings.throughput_seconds
        )
        thr = alternate(
            settings.inference_rounds, [(way, partial(load, call)) for way, call in calls.items()]
        )
    ms = {way: [1000 * v for v in flatten(lat[way])] for way in WAYS}
    rate = {way: [t.rate for t in runs] for way, runs in thr.items()}
    busy_ms = {way: [1000 * v for t in runs for v in t.latencies] for way, runs in thr.items()}
    c = settings.concurrency
    model = case.name
    diagnostic = []
    if LARGE_LEASE_WAY in rate:
        diagnostic.append(
            Row(NAME, f"{model}: throughput, concurrency {c}, lease size {DIAGNOSTIC_LEASE:,} (diagnostic)",
                "req/s", True, "plain gRPC", "Custos", rate["plain_grpc"], rate[LARGE_LEASE_WAY],
                note="the same, in a deployment created with --lease-size 100000")
        )  # fmt: skip
    return [
        Row(NAME, f"{model}: latency, concurrency 1", "ms", False, "plain gRPC", "Custos",
            ms["plain_grpc"], ms["custos"], Target("ratio_at_most", case.latency_target)),
        Row(NAME, f"{model}: latency, concurrency 1 (transport only)", "ms", False, "onnxruntime in-process",
            "plain gRPC", ms["onnxruntime"], ms["plain_grpc"], note="what TLS gRPC adds, no Custos"),
        Row(NAME, f"{model}: throughput, concurrency {c}", "req/s", True, "plain gRPC", "Custos",
            rate["plain_grpc"], rate["custos"], Target("ratio_at_least", 0.9),
            extra={"latency_ms_at_concurrency": {w: _summary(v) for w, v in busy_ms.items()}}),
        *diagnostic,
        Row(NAME, f"{model}: throughput, concurrency {c} (transport only)", "req/s", True,
            "onnxruntime in-process", "plain gRPC", rate["onnxruntime"], rate["plain_grpc"],
            note="what TLS gRPC adds, no Custos"),
    ]  # fmt: skip


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99)}


class _Ways:
    """One call of each way, all doing the same work per call: build the request, infer, read the result."""

    def __init__(
        self, bench: Bench, case: ModelCase, path: Path, baseline: str, enclave: str, manifest: Path
    ) -> None:
        self._case = case
        self._local = PlainModel(path.read_bytes())
        self._pool = ThreadPoolExecutor(INFERENCE_WORKERS, thread_name_prefix="local-inference")
        self._channel = grpc.secure_channel(
            baseline,
            grpc.ssl_channel_credentials(root_certificates=bench.tls.read("server_cert")),
            options=[
                ("grpc.ssl_target_name_override", SERVER_NAME),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = custos_pb2_grpc.InferenceStub(self._channel)
        self._connections: list[Connection] = []
        self.calls: dict[str, Callable[[], object]] = {
            "onnxruntime": self.in_process,
            "plain_grpc": self.plain,
        }
        self.add_custos("custos", enclave, manifest)

    def add_custos(self, way: str, enclave: str, manifest: Path) -> None:
        """A verified connection to an enclave (``client.connect``), called the way an end user calls it."""
        connection = connect(enclave, manifest)
        self._connections.append(connection)
        image = self._case.request().WhichOneof("input") == "image"

        def call() -> object:
            if image:
                return connection.infer_image(self._case.request().image, top_k=5)
            return connection.infer_tensor(_RESNET_INPUT, top_k=5)

        self.calls[way] = call

    def in_process(self) -> object:
        return self._pool.submit(self._local.infer, self._case.request()).result()

    def plain(self) -> object:
        response: custos_pb2.InferResponse = self._stub.Infer(self._case.request(), timeout=30)
        return tuple((p.index, p.label, p.score) for p in response.top)

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
        self._channel.close()
        self._pool.shutdown()
