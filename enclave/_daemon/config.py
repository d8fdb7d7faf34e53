"""The daemon's configuration: one frozen dataclass with explicit bounds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave._daemon.errors import ConfigError
from enclave.envelope import MAX_CHUNK_SIZE

MiB = 1 << 20
# A model chunk (at most MAX_CHUNK_SIZE plus its tag) must fit in one gRPC message.
_MIN_MESSAGE_BYTES = MAX_CHUNK_SIZE + 64 * 1024


def parse_address(value: str, *, what: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too); the host keeps its brackets."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {value!r}")
    return host, int(port)


# Addresses --custodian may list (replicas of one custodian).
MAX_CUSTODIANS = 16


def _default_threads() -> int:
    return max(1, min(4, (os.cpu_count() or 1) // 2))


@dataclass(frozen=True)
class DaemonConfig:
    """What ``enclave serve`` is told, and the bounds it enforces; bad values raise ``ConfigError``."""

    custodian: str
    custodian_ca_pem: bytes = field(repr=False)
    deployment: str
    join_token: str = field(repr=False)
    listen: str
    platform: str = "sim"
    metrics_listen: str | None = None
    ready_file: Path | None = None

    # Input bounds, checked before any decoding work.
    max_image_bytes: int = 8 * MiB
    max_image_pixels: int = 4096 * 4096
    max_tensor_bytes: int = 16 * MiB
    # Model bound, checked against the pushed header before decrypting anything.
    max_model_bytes: int = 1024 * MiB
    # gRPC messages in either direction, on every channel and server.
    max_message_bytes: int = 20 * MiB

    default_top_k: int = 5
    # Language models: generations running at once (each holds a thread and its own cache), and
    # how many more may wait for one (past that: refused, RESOURCE_EXHAUSTED); input bounds
    # checked before the tokenizer runs.
    generation_streams: int = 2
    generation_waiting: int = 16
    max_prompt_bytes: int = 1 * MiB
    max_chat_messages: int = 256
    intra_op_threads: int = field(default_factory=_default_threads)
    inference_workers: int = 2
    # Work an unauthenticated caller can cause before any quota is spent gets pools of its own,
    # each with a bound on the calls waiting (past it: refused as busy).
    decode_workers: int = 2
    attest_workers: int = 1
    waiting_per_pool: int = 64
    # Calls in progress on the inference server, and per client connection (HTTP/2 streams).
    max_concurrent_rpcs: int = 256
    max_streams_per_connection: int = 100

    # Seconds.
    connect_timeout: float = 15.0
    call_timeout: float = 10.0
    report_interval: float = 0.5
    topup_wait: float = 2.0
    reconnect_initial: float = 0.2
    reconnect_max: float = 5.0
    shutdown_grace: float = 5.0

    @property
    def custodians(self) -> tuple[str, ...]:
        """The enrolment addresses of the custodian's replicas, in the order given (``--custodian``)."""
        return tuple(address.strip() for address in self.custodian.split(","))

    def __post_init__(self) -> None:
        if not 0 < len(self.custodians) <= MAX_CUSTODIANS or not all(self.custodians):
            raise ConfigError(
                f"--custodian takes 1 to {MAX_CUSTODIANS} addresses HOST:PORT, separated by commas"
            )
        for address in self.custodians:
            parse_address(address, what="--custodian")
        parse_address(self.listen, what="--listen")
        if self.metrics_listen is not None:
            parse_address(self.metrics_listen, what="--metrics")
        if not self.deployment:
            raise ConfigError("a deployment name is required")
        if not self.join_token:
            raise ConfigError("a join token is required")
        if not 0 < self.max_image_bytes <= 64 * MiB:
            raise ConfigError("max_image_bytes must be between 1 byte and 64 MiB")
        if not 0 < self.max_image_pixels <= 1 << 28:
            raise ConfigError("max_image_pixels must be between 1 and 2**28")
        if not 0 < self.max_tensor_bytes <= 256 * MiB:
            raise ConfigError("max_tensor_bytes must be between 1 byte and 256 MiB")
        if not 0 < self.max_model_bytes <= 16 * 1024 * MiB:
            raise ConfigError("max_model_bytes must be between 1 byte and 16 GiB")
        needed = max(_MIN_MESSAGE_BYTES, self.max_image_bytes + 64 * 1024)
        if not needed <= self.max_message_bytes <= 1024 * MiB:
            raise ConfigError(f"max_message_bytes must be between {needed} and {1024 * MiB}")
        if not 1 <= self.default_top_k <= 1000:
            raise ConfigError("default_top_k must be between 1 and 1000")
        if not 1 <= self.generation_streams <= 256 or not 0 <= self.generation_waiting <= 4096:
            raise ConfigError("generation_streams must be 1 to 256, generation_waiting 0 to 4096")
        if not 0 < self.max_prompt_bytes <= 64 * MiB or not 1 <= self.max_chat_messages <= 65536:
            raise ConfigError("max_prompt_bytes must be 1 byte to 64 MiB, max_chat_messages 1 to 65536")
        threads = (self.intra_op_threads, self.inference_workers, self.decode_workers, self.attest_workers)
        if not all(1 <= count <= 256 for count in threads):
            raise ConfigError("thread counts must be between 1 and 256")
        if not 0 <= self.waiting_per_pool <= 4096:
            raise ConfigError("waiting_per_pool must be between 0 and 4096")
        if not 1 <= self.max_streams_per_connection <= self.max_concurrent_rpcs <= 65536:
            raise ConfigError(
                "max_concurrent_rpcs must be at least max_streams_per_connection, at most 65536"
            )
        for name in ("connect_timeout", "call_timeout", "report_interval", "reconnect_initial"):
            if not 0 < getattr(self, name) <= 3600:
                raise ConfigError(f"{name} must be positive and at most an hour")
        if not 0 <= self.topup_wait <= 60 or not 0 <= self.shutdown_grace <= 600:
            raise ConfigError("topup_wait and shutdown_grace are out of bounds")
        if not self.reconnect_initial <= self.reconnect_max <= 600:
            raise ConfigError("reconnect_max must be at least reconnect_initial and at most 600")

    @property
    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]

    @property
    def server_options(self) -> list[tuple[str, int]]:
        """The inference server's: its port its own (no SO_REUSEPORT sharing), bounded streams."""
        return [
            *self.grpc_options,
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
        ]


def custodian_ca_der(pem: bytes) -> bytes:
    """The custodian CA certificate (PEM) as DER, the form its fingerprint is taken over."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ConfigError("the custodian CA file is not a PEM certificate") from None
    return certificate.public_bytes(serialization.Encoding.DER)
