"""The console's client for the admin API on the data directory's unix socket.

Every method is one admin call; a refusal or an unreachable custodian raises
``ConsoleError`` with the custodian's one-line reason.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from custodian.admin import CONSOLE_HOST, CONSOLE_USER
from custodian.authority import CUSTODIAN_TLS_NAME
from custodian.errors import ConsoleError
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc

UPLOAD_PART_BYTES = 1 << 20
_TIMEOUT = 30.0
_MAX_MESSAGE = 64 << 20

_Response = TypeVar("_Response")
# How gRPC reports a server that ended the TLS handshake: with TLS 1.3 the client finishes its
# half first and sees the refusal of its certificate only as the socket closing.
_REFUSED_HANDSHAKE = ("Socket closed", "Handshake", "handshake", "TLSV1_ALERT", "SSLV3_ALERT")


@dataclass(frozen=True)
class RemoteAdmin:
    """The admin TCP listener and the credentials from ``custodian admin-cert``."""

    address: str
    key_pem: bytes = field(repr=False)
    certificate_pem: bytes
    custodian_ca_pem: bytes
    # Where the CA came from, to name it when the custodian's certificate does not chain to it.
    custodian_ca_file: str = "--custodian-ca"


class Console:
    def __init__(self, socket: Path, *, remote: RemoteAdmin | None = None, timeout: float = _TIMEOUT) -> None:
        self._socket = socket
        self._remote = remote
        self._timeout = timeout
        options: list[tuple[str, str | int]] = [("grpc.max_receive_message_length", _MAX_MESSAGE)]
        if remote is None:
            self._channel = grpc.insecure_channel(f"unix:{socket.absolute()}", options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=remote.custodian_ca_pem,
                private_key=remote.key_pem,
                certificate_chain=remote.certificate_pem,
            )
            options.append(("grpc.ssl_target_name_override", CUSTODIAN_TLS_NAME))
            self._channel = grpc.secure_channel(remote.address, credentials, options=options)
        self._stub = pb_grpc.AdminStub(self._channel)
        self._metadata = _about_console()

    def __enter__(self) -> Console:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self, method: Callable[..., _Response], request: Any, *, timeout: float | None = None
    ) -> _Response:
        if self._remote is None and not self._socket.exists():
            raise ConsoleError(
                f"no custodian is serving {self._socket.parent}: start it with `custodian serve`"
            )
        try:
            return method(request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            details: str = exc.details() or code.name
            if code is grpc.StatusCode.UNAVAILABLE:
                raise ConsoleError(self._unavailable(details)) from None
            raise ConsoleError(details) from None

    def _unavailable(self, details: str) -> str:
        """One line for a call that reached no custodian: a refused TLS handshake is said as such."""
        if self._remote is None:
            return f"the custodian at unix:{self._socket} is not answering: {details}"
        where, ca = self._remote.address, self._remote.custodian_ca_file
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return f"the certificate of the custodian at {where} does not chain to --custodian-ca {ca}"
        if any(sign in details for sign in _REFUSED_HANDSHAKE):
            return (
                f"the custodian at {where} refused the TLS connection: it accepts only an unexpired"
                " certificate from its own `custodian admin-cert` (and --admin must be its --admin-listen)"
            )
        return f"the custodian at {where} is not answering: {_last_error(details)}"

    def add_model(self, name: str, path: Path) -> pb.ModelInfo:
        """Upload a model file in parts; the custodian seals it and keeps no plaintext."""
        try:
            handle = path.open("rb")
        except OSError as exc:
            raise ConsoleError(f"cannot read {path}: {exc.strerror}") from None
        with handle:
            # Upload time grows with the model: no deadline beyond the channel's own.
            return self._call(self._stub.AddModel, _upload(name, handle.read), timeout=24 * 3600)

    def add_model_data(self, name: str, data: bytes | bytearray) -> pb.ModelInfo:
        """Upload a model held in memory (a converted language model), in parts."""
        view, position = memoryview(data), 0

        def read(size: int) -> bytes:
            nonlocal position
            part = bytes(view[position : position + size])
            position += len(part)
            return part

        return self._call(self._stub.AddModel, _upload(name, read), timeout=24 * 3600)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest()).models)

    def create_deployment(
        self,
        name: str,
        *,
        model: str,
        manifest: str,
        offline_grace_seconds: int,
        lease_size: int,
        zeroize_after_seconds: int = 0,
    ) -> pb.DeploymentCreated:
        request = pb.CreateDeploymentRequest(
            name=name,
            model=model,
            manifest=manifest,
            offline_grace_seconds=offline_grace_seconds,
            lease_size=lease_size,
            zeroize_after_seconds=zeroize_after_seconds,
        )
        return self._call(self._stub.CreateDeployment, request)

    def rotate_token(self, name: str) -> pb.DeploymentCreated:
        return self._call(self._stub.RotateToken, pb.RotateTokenRequest(name=name))

    def manifest(self, name: str) -> str:
        return self._call(self._stub.GetDeploymentManifest, pb.DeploymentManifestRequest(name=name)).manifest

    def grant(self, deployment: str, units: int) -> pb.QuotaChange:
        return self._call(self._stub.Grant, pb.GrantRequest(deployment=deployment, units=units))

    def revoke(self, deployment: str, *, units: int = 0, everything: bool = False) -> pb.QuotaChange:
        return self._call(
            self._stub.Revoke, pb.RevokeRequest(deployment=deployment, units=units, all=everything)
        )

    def suspend(self, deployment: str) -> pb.DeploymentUsage:
        return self._call(self._stub.Suspend, pb.DeploymentRequest(deployment=deployment))

    def resume(self, deployment: str) -> pb.DeploymentUsage:
        return self._call(self._stub.Resume, pb.DeploymentRequest(deployment=deployment))

    def usage(self, deployment: str = "") -> list[pb.DeploymentUsage]:
        return list(self._call(self._stub.Usage, pb.UsageRequest(deployment=deployment)).deployments)

    def enclaves(self, deployment: str = "") -> list[pb.EnclaveInfo]:
        return list(self._call(self._stub.Enclaves, pb.EnclavesRequest(deployment=deployment)).enclaves)

    def issue_admin_certificate(self, name: str, csr: bytes, *, days: int) -> pb.AdminCertificate:
        request = pb.AdminCertificateRequest(name=name, csr=csr, validity_days=days)
        return self._call(self._stub.IssueAdminCertificate, request)

    def custodian_ca(self) -> bytes:
        return self._call(self._stub.CustodianCa, pb.CaRequest()).pem


def _last_error(details: str) -> str:
    """gRPC's reason for an unreachable address, without its resolver prefix."""
    return details.rpartition("last error: ")[2] or details


def _about_console() -> tuple[tuple[str, str], ...]:
    """Who runs this console, for the audit log's origin (claimed: the custodian cannot check it)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    clean = [
        ("".join(c for c in v if c.isascii() and c.isprintable()) or "?")[:64]
        for v in (user, socket.gethostname())
    ]
    return ((CONSOLE_USER, clean[0]), (CONSOLE_HOST, clean[1]))


def _upload(name: str, read: Callable[[int], bytes]) -> Iterator[pb.ModelUpload]:
    yield pb.ModelUpload(name=name)
    while part := read(UPLOAD_PART_BYTES):
        yield pb.ModelUpload(data=part)
