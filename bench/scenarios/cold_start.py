"""5. Cold start: process start to first served inference, the demo model.

Custos: ``enclave serve`` is spawned (the deployment and the end user's
manifest already exist), measures its code, enrols, is pushed the model, loads
it, serves; the benchmark polls the ready file, connects (verifying the
enclave) and classifies one digit. The plain gRPC server (``bench._baseline``)
is spawned with the model file, loads it, serves; the benchmark connects over
TLS and classifies the same digit. The enclave's log splits its time into
phases (``extra.phases`` in ``report.json``).
"""

from __future__ import annotations

import time

import grpc

from bench._context import Bench
from bench._processes import Timeline, timeline
from bench._stats import Row, alternate
from bench._tls import SERVER_NAME
from client import connect
from enclave.attestation import measurement
from protos import custos_pb2, custos_pb2_grpc
from testkit.processes import DIGITS_MODEL, DIGITS_SAMPLES, stopping

NAME = "cold-start"


def run(bench: Bench) -> list[Row]:
    system = bench.system
    system.add_model(DIGITS_MODEL, "digits")
    image = (DIGITS_SAMPLES / "digit-5.png").read_bytes()
    deployment = system.deployment("cold", "digits")
    server_cert = bench.tls.read("server_cert")
    timelines: list[tuple[Timeline, float]] = []

    def custos() -> float:
        nonlocal deployment
        enclave, deployment = system.serving_enclave("cold", "digits", deployment=deployment)
        with stopping(enclave), connect(enclave.address, deployment.end_user_manifest) as connection:
            connection.infer_image(image)
            done = time.time()
        timelines.append((timeline(enclave), done))
        return done - enclave.spawned

    def plain() -> float:
        baseline = bench.baseline("cold").start(model=DIGITS_MODEL)
        with (
            stopping(baseline),
            grpc.secure_channel(
                baseline.address,
                grpc.ssl_channel_credentials(root_certificates=server_cert),
                options=[("grpc.ssl_target_name_override", SERVER_NAME)],
            ) as channel,
        ):
            custos_pb2_grpc.InferenceStub(channel).Infer(custos_pb2.InferRequest(image=image), timeout=30)
            done = time.time()
        return done - baseline.spawned

    rounds = bench.settings.cold_start_rounds
    bench.say(f"cold-start: {rounds} rounds of plain gRPC server and enclave start")
    results = alternate(rounds, [("plain", plain), ("custos", custos)])
    return [
        Row(
            NAME,
            "digits: process start → first served inference",
            "s",
            False,
            "plain gRPC server",
            "enclave serve",
            results["plain"],
            results["custos"],
            extra={"phases": _phases(timelines), "code_measurement_in_process_s": _code_measurement()},
        )
    ]


def _code_measurement() -> float:
    """What hashing the enclave's sources (its code measurement) takes, measured here."""
    start = time.perf_counter()
    measurement.code_sha384()
    return time.perf_counter() - start


def _phases(timelines: list[tuple[Timeline, float]]) -> dict[str, list[float | None]]:
    def span(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round(end - start, 4)

    return {
        "python_start_and_code_measurement_s": [span(t.spawned, t.enrol_started) for t, _ in timelines],
        "enrolment_s": [span(t.enrol_started, t.enrolled) for t, _ in timelines],
        "model_push_s": [span(t.enrolled, t.model_received) for t, _ in timelines],
        "onnxruntime_load_s": [span(t.model_received, t.model_loaded) for t, _ in timelines],
        "wipe_lease_tls_server_s": [span(t.model_loaded, t.serving) for t, _ in timelines],
        "ready_to_first_inference_s": [span(t.serving, done) for t, done in timelines],
    }
