"""The admin API on the data directory's unix socket: what the console subcommands call.

Handlers translate between the wire and the domain; errors become status codes
in ``custodian._status``. Every change is audited with its origin: the
listener it came through (the unix socket, whose 0600 mode limits it to the
custodian's user) and what the console says of itself (its user and host, sent
as call metadata and recorded as claimed, not proven).
"""

# ruff: noqa: N802 - gRPC method names are the wire contract's.

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc.aio

from custodian.admin_access import AdminAccess
from custodian.deployments import ADMIN, Deployments, DeploymentUsage
from custodian.errors import InvalidRequestError, RefusedError
from custodian.ledger import ModelRecord
from custodian.model_check import inputs_from_json
from custodian.model_store import ModelStore
from custodian.roster import EnclaveStatus, Roster
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# Call metadata the console sends about itself.
CONSOLE_USER = "custos-console-user"
CONSOLE_HOST = "custos-console-host"
_MAX_CLAIM = 64


def over_unix_socket(context: Context) -> bool:
    """The call came through the admin unix socket (grpc reports no peer address for some)."""
    peer = context.peer() or ""
    return peer.startswith("unix:") or not peer


def origin(context: Context, socket: str) -> str:
    """Where an admin call came from, for the audit log."""
    where = f"unix:{socket}" if over_unix_socket(context) else context.peer()
    names = list(context.auth_context().get("x509_common_name", ()))
    if names:
        where += f" certificate CN={names[0].decode(errors='replace')}"
    claims = {k: str(v) for k, v in (context.invocation_metadata() or ())}
    user, host = claims.get(CONSOLE_USER, ""), claims.get(CONSOLE_HOST, "")
    if user or host:
        where += f" console {_clean(user)}@{_clean(host)} (claimed)"
    return where


def _clean(text: str) -> str:
    return "".join(c for c in text[:_MAX_CLAIM] if c.isprintable() and not c.isspace()) or "?"


class Admin(pb_grpc.AdminServicer):
    def __init__(
        self,
        *,
        store: ModelStore,
        deployments: Deployments,
        roster: Roster,
        access: AdminAccess,
        custodian_ca_pem: bytes,
        socket: str = "admin.sock",
    ) -> None:
        self._store = store
        self._deployments = deployments
        self._roster = roster
        self._access = access
        self._ca_pem = custodian_ca_pem
        self._socket = socket

    def _origin(self, context: Context) -> str:
        return origin(context, self._socket)

    async def AddModel(
        self, request_iterator: AsyncIterator[pb.ModelUpload], context: Context
    ) -> pb.ModelInfo:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "name":
            raise InvalidRequestError("a model upload starts with the model's name")
        record = await self._store.add(
            first.name, _data(request_iterator), actor=ADMIN, origin=self._origin(context)
        )
        return _model_info(record)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model_info(m) for m in await self._store.models()])

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: Context
    ) -> pb.DeploymentCreated:
        token = await self._deployments.create(
            request.name,
            model=request.model,
            manifest=request.manifest,
            offline_grace_seconds=request.offline_grace_seconds,
            lease_size=request.lease_size,
            zeroize_after_seconds=request.zeroize_after_seconds,
            origin=self._origin(context),
        )
        return pb.DeploymentCreated(name=request.name, join_token=token)

    async def RotateToken(self, request: pb.RotateTokenRequest, context: Context) -> pb.DeploymentCreated:
        token = await self._deployments.rotate_token(request.name, origin=self._origin(context))
        return pb.DeploymentCreated(name=request.name, join_token=token)

    async def GetDeploymentManifest(
        self, request: pb.DeploymentManifestRequest, context: Context
    ) -> pb.DeploymentManifest:
        return pb.DeploymentManifest(manifest=await self._deployments.manifest(request.name))

    async def Grant(self, request: pb.GrantRequest, context: Context) -> pb.QuotaChange:
        usage, changed = await self._deployments.grant(
            request.deployment, request.units, origin=self._origin(context)
        )
        return pb.QuotaChange(usage=_usage(usage), changed=changed)

    async def Revoke(self, request: pb.RevokeRequest, context: Context) -> pb.QuotaChange:
        usage, changed = await self._deployments.revoke(
            request.deployment, units=request.units, everything=request.all, origin=self._origin(context)
        )
        return pb.QuotaChange(usage=_usage(usage), changed=changed)

    async def Suspend(self, request: pb.DeploymentRequest, context: Context) -> pb.DeploymentUsage:
        return _usage(await self._deployments.suspend(request.deployment, origin=self._origin(context)))

    async def Resume(self, request: pb.DeploymentRequest, context: Context) -> pb.DeploymentUsage:
        return _usage(await self._deployments.resume(request.deployment, origin=self._origin(context)))

    async def Usage(self, request: pb.UsageRequest, context: Context) -> pb.UsageResponse:
        usages = await self._deployments.usage(request.deployment or None)
        return pb.UsageResponse(deployments=[_usage(u) for u in usages])

    async def Enclaves(self, request: pb.EnclavesRequest, context: Context) -> pb.EnclavesResponse:
        enclaves = await self._roster.enclaves(request.deployment or None)
        return pb.EnclavesResponse(enclaves=[_enclave(e) for e in enclaves])

    async def CustodianCa(self, request: pb.CaRequest, context: Context) -> pb.CaResponse:
        return pb.CaResponse(pem=self._ca_pem)

    async def IssueAdminCertificate(
        self, request: pb.AdminCertificateRequest, context: Context
    ) -> pb.AdminCertificate:
        if not over_unix_socket(context):
            raise RefusedError("admin certificates are issued over the unix socket only")
        where = self._origin(context)
        issued = await self._access.issue(request.name, request.csr, days=request.validity_days, origin=where)
        return pb.AdminCertificate(
            certificate=issued.certificate_pem,
            admin_ca=issued.admin_ca_pem,
            custodian_ca=issued.custodian_ca_pem,
        )


async def _data(parts: AsyncIterator[pb.ModelUpload]) -> AsyncIterator[bytes]:
    async for part in parts:
        if part.WhichOneof("part") != "data":
            raise InvalidRequestError("a model upload sends its name once, first")
        yield part.data


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


def _model_info(m: ModelRecord) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=m.name,
        model_id=m.model_id.hex(),
        sha384=m.sha384.hex(),
        size=m.size,
        chunk_count=m.chunk_count,
        created_at=_iso(m.created_at),
        inputs="; ".join(i.describe() for i in inputs_from_json(m.inputs)),
    )


def _usage(u: DeploymentUsage) -> pb.DeploymentUsage:
    return pb.DeploymentUsage(
        name=u.name,
        model=u.model,
        suspended=u.suspended,
        balance=u.balance,
        leased=u.leased,
        used=u.used,
        granted_total=u.granted_total,
        offline_grace_seconds=u.offline_grace_seconds,
        lease_size=u.lease_size,
        instances=u.instances,
        unreported=u.unreported,
        zeroize_after_seconds=u.zeroize_after_seconds,
        revoked=u.revoked,
        overdrawn=u.overdrawn,
        unit=u.unit,
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
    )


def _enclave(e: EnclaveStatus) -> pb.EnclaveInfo:
    return pb.EnclaveInfo(
        instance_id=e.instance_id,
        deployment=e.deployment,
        platform=e.platform,
        key_sha256=e.key_sha256,
        enrolled_at=_iso(e.enrolled_at),
        last_seen=_iso(e.last_seen),
        connected=e.connected,
        lease_id=e.lease_id,
        lease_limit=e.lease_limit,
        lease_used=e.lease_used,
        lease_expires_at=_iso(e.lease_expires_at),
        state=e.state,
        offline_since=_iso(e.offline_since),
        lease_state=e.lease_state,
        last_receipt_seq=e.last_receipt_seq,
        last_receipt_used=e.last_receipt_used,
        last_receipt_at=_iso(e.last_receipt_at),
        replica=e.replica,
    )
