"""The admin API on the data directory's unix socket: what the console subcommands call.

Handlers translate between the wire and the domain; errors become status codes
in ``custodian._status``.
"""

# ruff: noqa: N802 - gRPC method names are the wire contract's.

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc.aio

from custodian.deployments import ADMIN, Deployments, DeploymentUsage, EnclaveStatus
from custodian.errors import InvalidRequestError
from custodian.ledger import ModelRecord
from custodian.model_store import ModelStore
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class Admin(pb_grpc.AdminServicer):
    def __init__(self, *, store: ModelStore, deployments: Deployments, custodian_ca_pem: bytes) -> None:
        self._store = store
        self._deployments = deployments
        self._ca_pem = custodian_ca_pem

    async def AddModel(
        self, request_iterator: AsyncIterator[pb.ModelUpload], context: Context
    ) -> pb.ModelInfo:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "name":
            raise InvalidRequestError("a model upload starts with the model's name")
        record = await self._store.add(first.name, _data(request_iterator), actor=ADMIN)
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
        )
        return pb.DeploymentCreated(name=request.name, join_token=token)

    async def RotateToken(self, request: pb.RotateTokenRequest, context: Context) -> pb.DeploymentCreated:
        token = await self._deployments.rotate_token(request.name)
        return pb.DeploymentCreated(name=request.name, join_token=token)

    async def GetDeploymentManifest(
        self, request: pb.DeploymentManifestRequest, context: Context
    ) -> pb.DeploymentManifest:
        return pb.DeploymentManifest(manifest=await self._deployments.manifest(request.name))

    async def Grant(self, request: pb.GrantRequest, context: Context) -> pb.QuotaChange:
        usage, changed = await self._deployments.grant(request.deployment, request.units)
        return pb.QuotaChange(usage=_usage(usage), changed=changed)

    async def Revoke(self, request: pb.RevokeRequest, context: Context) -> pb.QuotaChange:
        usage, changed = await self._deployments.revoke(
            request.deployment, units=request.units, everything=request.all
        )
        return pb.QuotaChange(usage=_usage(usage), changed=changed)

    async def Suspend(self, request: pb.DeploymentRequest, context: Context) -> pb.DeploymentUsage:
        return _usage(await self._deployments.suspend(request.deployment))

    async def Resume(self, request: pb.DeploymentRequest, context: Context) -> pb.DeploymentUsage:
        return _usage(await self._deployments.resume(request.deployment))

    async def Usage(self, request: pb.UsageRequest, context: Context) -> pb.UsageResponse:
        usages = await self._deployments.usage(request.deployment or None)
        return pb.UsageResponse(deployments=[_usage(u) for u in usages])

    async def Enclaves(self, request: pb.EnclavesRequest, context: Context) -> pb.EnclavesResponse:
        enclaves = await self._deployments.enclaves(request.deployment or None)
        return pb.EnclavesResponse(enclaves=[_enclave(e) for e in enclaves])

    async def CustodianCa(self, request: pb.CaRequest, context: Context) -> pb.CaResponse:
        return pb.CaResponse(pem=self._ca_pem)


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
    )
