"""2. Model provisioning: enrolment to first served inference, for a 50 MiB and a 500 MiB model.

Custos (subject): the model is added with ``custodian model add``; each round
starts a fresh ``enclave serve``, which enrols, is pushed the sealed model over
mutual TLS, opens it in memory (AES-256-GCM ``decrypt_into`` one preallocated
buffer chunk by chunk, SHA-384 over the plaintext as it opens), loads it into
onnxruntime and serves; the benchmark connects (verified) and runs one
inference. The enclave's log timestamps split the time into phases:
enrolment, transfer (fetch + decrypt + hash), load, ready; its log also gives
the seconds its opener spent decrypting and hashing.

Baselines, alternating with it round by round:

- a plain gRPC stream of the same bytes over TLS (``bench._baseline``,
  ``FetchModel``, 1 MiB messages read from disk) into memory, on a fresh
  channel, followed by an onnxruntime load and one inference. The target
  compares like with like, both ending at the first inference; the ratio
  against the stream alone is shown beside it (an onnxruntime load, the same
  cost for both, is then counted against Custos only);
- the floors, in memory in this process: AES-256-GCM ``decrypt_into`` of the
  same sealed chunks into a preallocated buffer, and one SHA-384 over the
  plaintext; the enclave's decrypt and hash times are compared with them, and
  ``enclave.envelope.ModelOpener`` (decrypt and hash together) is run here too.
  The decrypt target is per core: the CPU time of the thread in its AES-GCM
  calls. Wall clock is shown beside it; on this benchmark's two cores it also
  counts the time the enclave's thread waits for a core while the custodian
  (colocated here, remote in a deployment) sends and the hash worker runs.
  SHA-384, which the design requires of the whole plaintext, runs at about a
  tenth of AES-GCM's speed on CPUs with AES instructions: opening as a whole
  is bound by it, not by decryption.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import grpc
import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench._context import Bench
from bench._plain_model import PlainModel
from bench._processes import Timeline, timeline
from bench._stats import Row, Target, alternate
from bench._tls import SERVER_NAME
from bench.models.blob import build as blob_build
from client import connect
from enclave.envelope import (
    TAG_SIZE,
    ModelOpener,
    ModelSealer,
    StageClock,
    chunk_nonce_aad,
    new_data_key,
    new_model_id,
)
from protos import custos_pb2, custos_pb2_grpc
from testkit.processes import stopping

NAME = "provisioning"
MiB = 1 << 20


@dataclass(frozen=True)
class Provisioned:
    """One Custos round: the enclave's timeline and when the first inference came back."""

    timeline: Timeline
    first_inference: float

    def span(self, start: float | None, end: float | None) -> float:
        if start is None or end is None:
            raise RuntimeError(f"the enclave log lacks a start-up event: {self.timeline}")
        return end - start

    def stage(self, name: str) -> float:
        """Seconds the enclave's model opener spent in ``name`` (``decrypt_seconds``,
        ``decrypt_cpu_seconds``, ``hash_seconds``, ``hash_cpu_seconds``)."""
        seconds = getattr(self.timeline, name)
        if not seconds:
            raise RuntimeError(f"the enclave log lacks its model opening times: {self.timeline}")
        return float(seconds)


@dataclass(frozen=True)
class Plain:
    stream: float  # seconds to receive every byte
    total: float  # stream + onnxruntime load + first inference


def run(bench: Bench) -> list[Row]:
    rows: list[Row] = []
    for size in bench.settings.provision_sizes_mib:
        rows += _run_size(bench, size)
    if bench.settings.quick:
        bench.notes.append("Provisioning: quick mode measures the 50 MiB model only (no 500 MiB case).")
    return rows


def _run_size(bench: Bench, size_mib: int) -> list[Row]:
    system = bench.system
    bench.say(f"provisioning/{size_mib} MiB: building the model, adding it to the custodian")
    path = blob_build.build(size_mib)
    name = f"blob{size_mib}"
    added = time.perf_counter()
    system.add_model(path, name)
    add_seconds = time.perf_counter() - added
    model_bytes = path.stat().st_size
    deployment = system.deployment(f"provision-{size_mib}", name)
    baseline = bench.baseline(name).start(stream_file=path)
    rounds = bench.settings.provision_rounds
    with stopping(baseline):
        plain: list[Plain] = []
        custos: list[Provisioned] = []

        def custos_round() -> None:
            nonlocal deployment
            enclave, deployment = system.serving_enclave("provision", name, deployment=deployment)
            with stopping(enclave):
                with connect(enclave.address, deployment.end_user_manifest) as connection:
                    connection.infer_tensor(np.zeros((1, blob_build.FEATURES), dtype=np.float32))
                    done = time.time()
                custos.append(Provisioned(timeline(enclave), done))

        def plain_round() -> None:
            plain.append(_plain_round(bench, baseline.address))

        bench.say(f"provisioning/{size_mib} MiB: {rounds} rounds of plain stream and Custos enrolment")
        alternate(rounds, [("plain", plain_round), ("custos", custos_round)])

    bench.say(f"provisioning/{size_mib} MiB: decrypting and hashing in memory (floors), ModelOpener")
    floor, sha384, opener = _in_memory_rounds(path.read_bytes(), rounds)

    def rate(seconds: float) -> float:
        return model_bytes / MiB / seconds

    e2e = [p.span(p.timeline.enrol_started, p.first_inference) for p in custos]
    transfer = [p.span(p.timeline.enrolled, p.timeline.model_received) for p in custos]
    phases = {
        "process_start_s": [p.span(p.timeline.spawned, p.timeline.enrol_started) for p in custos],
        "enrolment_s": [p.span(p.timeline.enrol_started, p.timeline.enrolled) for p in custos],
        "transfer_s": transfer,
        "onnxruntime_load_s": [p.span(p.timeline.model_received, p.timeline.model_loaded) for p in custos],
        # After the session is built: wiping the decrypted buffer, the lease, the attested TLS
        # certificate and the server start.
        "wipe_lease_tls_server_s": [p.span(p.timeline.model_loaded, p.timeline.serving) for p in custos],
        "connect_first_inference_s": [p.span(p.timeline.serving, p.first_inference) for p in custos],
        "enrolment_to_first_inference_s": e2e,
    }
    label = f"{size_mib} MiB"
    return [
        Row(NAME, f"{label}: enrolment → first served inference", "MiB/s", True,
            "plain stream → load → first inference", "Custos", [rate(p.total) for p in plain],
            [rate(s) for s in e2e], Target("ratio_at_least", 0.6),
            note="model size / time; both end at the first inference",
            extra={"phases": phases, "model_bytes": model_bytes, "custodian_model_add_s": add_seconds}),
        Row(NAME, f"{label}: enrolment → first served inference, against the stream alone", "MiB/s",
            True, "plain gRPC stream", "Custos", [rate(p.stream) for p in plain], [rate(s) for s in e2e],
            note="the baseline stops when the bytes are in; Custos also loads the model and serves"),
        Row(NAME, f"{label}: transfer only (fetch + decrypt + SHA-384)", "MiB/s", True, "plain gRPC stream",
            "Custos", [rate(p.stream) for p in plain], [rate(s) for s in transfer],
            note="enclave log: enrolled → model received"),
        Row(NAME, f"{label}: decrypt in the enclave, per core (decrypt_into, preallocated)", "MiB/s", True,
            "AES-256-GCM in memory (floor)", "Custos", [rate(c.cpu_seconds) for c in floor],
            [rate(p.stage("decrypt_cpu_seconds")) for p in custos], Target("ratio_at_least", 0.8),
            note="CPU time of the thread in the enclave's AES-GCM calls during provisioning"),
        Row(NAME, f"{label}: decrypt in the enclave, wall clock", "MiB/s", True,
            "AES-256-GCM in memory (floor)", "Custos", [rate(c.wall_seconds) for c in floor],
            [rate(p.stage("decrypt_seconds")) for p in custos],
            note="also counts time the thread waited for a core while the custodian sent and the "
            "hash worker ran (2 cores here)"),
        Row(NAME, f"{label}: SHA-384 in the enclave", "MiB/s", True, "SHA-384 in memory (floor)", "Custos",
            [rate(s) for s in sha384], [rate(p.stage("hash_seconds")) for p in custos],
            note="the model measurement, over the plaintext as it opens"),
        Row(NAME, f"{label}: open in memory (decrypt + SHA-384)", "MiB/s", True,
            "AES-256-GCM in memory (floor)", "ModelOpener", [rate(c.wall_seconds) for c in floor],
            [rate(s) for s in opener],
            note="the enclave's ModelOpener run here; bounded by SHA-384 (see its floor)"),
    ]  # fmt: skip


def _plain_round(bench: Bench, address: str) -> Plain:
    """Stream the model over a fresh TLS channel into memory, then load it and run it once."""
    start = time.perf_counter()
    channel = grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=bench.tls.read("server_cert")),
        options=[
            ("grpc.ssl_target_name_override", SERVER_NAME),
            ("grpc.max_receive_message_length", 20 * MiB),
        ],
    )
    with channel:
        buffer = bytearray()
        offset = 0
        for part in custos_pb2_grpc.EnclaveGatewayStub(channel).FetchModel(custos_pb2.FetchModelRequest()):
            if part.WhichOneof("part") == "header":
                buffer = bytearray(part.header.plaintext_size)
            else:
                data = part.chunk.ciphertext
                buffer[offset : offset + len(data)] = data
                offset += len(data)
    streamed = time.perf_counter()
    model = PlainModel(bytes(buffer))
    model.classify(np.zeros((1, blob_build.FEATURES), dtype=np.float32), 5)
    return Plain(stream=streamed - start, total=time.perf_counter() - start)


def _in_memory_rounds(plaintext: bytes, rounds: int) -> tuple[list[StageClock], list[float], list[float]]:
    """The floors (AES-256-GCM ``decrypt_into`` a preallocated buffer, wall and CPU time; seconds
    for one SHA-384 over the plaintext) and seconds for the enclave's ``ModelOpener``, over the same
    sealed chunks."""
    key, model_id = new_data_key(), new_model_id()
    sealer = ModelSealer(key, model_id)
    chunks = [*sealer.update(plaintext), sealer.finish()]
    sha384 = sealer.sha384
    inputs = [(*chunk_nonce_aad(model_id, c.index, c.final), c.ciphertext) for c in chunks]
    buffer = memoryview(bytearray(len(plaintext)))

    floors: list[StageClock] = []

    def aes_gcm() -> float:
        aead = AESGCM(key)
        clock = StageClock()
        with clock.timing():
            offset = 0
            for nonce, aad, ciphertext in inputs:
                size = len(ciphertext) - TAG_SIZE
                aead.decrypt_into(nonce, ciphertext, aad, buffer[offset : offset + size])
                offset += size
        floors.append(clock)
        return clock.wall_seconds

    def sha() -> float:
        start = time.perf_counter()
        hashlib.sha384(plaintext).digest()
        return time.perf_counter() - start

    def opener() -> float:
        start = time.perf_counter()
        opened = ModelOpener(
            key,
            model_id,
            size=len(plaintext),
            chunk_size=sealer.chunk_size,
            chunk_count=len(chunks),
            sha384=sha384,
        )
        for chunk in chunks:
            opened.add(chunk.index, chunk.final, chunk.ciphertext)
        opened.finish()
        return time.perf_counter() - start

    aes_gcm(), sha(), opener()  # warm-up
    floors.clear()
    times = alternate(max(rounds, 5), [("aes_gcm", aes_gcm), ("sha384", sha), ("opener", opener)])
    return floors, times["sha384"], times["opener"]
