"""The inference listener: its port bound before anything is enrolled, its certificate set later.

``enclave serve`` binds its listener first, so a port it cannot have (another
process holds it; ``grpc.so_reuseport`` is off, so two enclaves never share
one) fails the start before the custodian has enrolled an instance, pushed the
model or opened a lease that would be charged for nothing.

The TLS certificate carries evidence over the measurement log, model hash
included, so it exists only once the model is loaded. The port is bound with
gRPC's dynamic server credentials: the certificate is read at each handshake,
and the server accepts connections only from ``start``, once the attested
certificate is in place. The placeholder certificate made at bind time is
never shown to anyone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave._daemon.config import DaemonConfig, parse_address
from enclave._daemon.errors import ListenError
from protos import custos_pb2_grpc


class _Current(custos_pb2_grpc.InferenceServicer):
    """Calls go to the service the current enrolment attempt set: one listener serves them all."""

    def __init__(self) -> None:
        self.service: custos_pb2_grpc.InferenceServicer | None = None

    def _target(self) -> custos_pb2_grpc.InferenceServicer:
        if self.service is None:
            raise RuntimeError("the listener was started before a service was set")
        return self.service

    async def Infer(self, request: Any, context: Any) -> Any:  # noqa: N802 -- gRPC method name
        return await self._target().Infer(request, context)  # type: ignore[misc]

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802 -- gRPC method name
        chunks = cast(AsyncGenerator[Any, None], self._target().Generate(request, context))
        async with contextlib.aclosing(chunks) as stream:
            async for chunk in stream:
                yield chunk

    async def Attest(self, request: Any, context: Any) -> Any:  # noqa: N802 -- gRPC method name
        return await self._target().Attest(request, context)  # type: ignore[misc]

    async def Status(self, request: Any, context: Any) -> Any:  # noqa: N802 -- gRPC method name
        return await self._target().Status(request, context)  # type: ignore[misc]


class InferenceListener:
    """Bound once per session: gRPC releases the port of a server only once it was started, so the
    enrolment attempts of a session share this one, each setting its own service on it."""

    def __init__(self, config: DaemonConfig, address: str) -> None:
        self._pending: tuple[bytes, bytes] | None = None
        self._current = _Current()
        self.server = grpc.aio.server(
            options=config.server_options, maximum_concurrent_rpcs=config.max_concurrent_rpcs
        )
        custos_pb2_grpc.add_InferenceServicer_to_server(self._current, self.server)
        # gRPC documents a fetcher's None as "keep the current certificate"; its type stubs omit it.
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], self._certificate_update)
        credentials = grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([_placeholder()]), fetcher
        )
        try:
            port = self.server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ListenError(f"cannot listen on {address}: {_why_not(address)}")
        host, _ = parse_address(address, what="--listen")
        self.port = port
        self.address = f"{host}:{port}"

    def serve(self, service: custos_pb2_grpc.InferenceServicer) -> None:
        """Send the calls to ``service`` (the current attempt's)."""
        self._current.service = service

    async def start(self, private_key_pem: bytes, certificate_pem: bytes) -> None:
        """Accept connections, presenting this certificate from the first handshake on."""
        self._pending = (private_key_pem, certificate_pem)
        await self.server.start()

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)

    def _certificate_update(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new certificate once, then None (keep it)."""
        pending, self._pending = self._pending, None
        return None if pending is None else grpc.ssl_server_certificate_configuration([pending])


def _why_not(address: str) -> str:
    """gRPC does not say why a bind failed: find out by trying it with a plain socket."""
    host, port = parse_address(address, what="--listen")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "address in use"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return "not an address of this host"
                return exc.strerror or str(exc)
    return "gRPC refused the address"


def _placeholder() -> tuple[bytes, bytes]:
    """A throwaway self-signed key and certificate, needed to bind; never presented (see module doc)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not serving yet")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(minutes=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)
