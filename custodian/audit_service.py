"""The audit log on the admin listeners: read only, a page at a time, checked by whoever reads it.

``custodian audit`` and ``custodian audit export`` over ``--admin`` read it
here (``custodian._audit_remote``), through the same listeners and the same
admin certificates as every console command. The server sends entries as
stored, with their hashes; the reader checks the chain on its own machine, so
a remote auditor need not trust the network path, nor this code, for it.
"""

# ruff: noqa: N802 - gRPC method names are the wire contract's.

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from custodian.audit import AuditEntry
from custodian.audit_stream import AuditSource
from custodian.ledger import InstanceRecord
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AuditLogService(pb_grpc.AuditLogServicer):
    def __init__(self, source: AuditSource) -> None:
        self._source = source

    async def Entries(
        self, request: pb.AuditEntriesRequest, context: Context
    ) -> AsyncIterator[pb.AuditLogEntry]:
        async for entry in self._source.entries(after=request.after_seq):
            yield entry_message(entry)

    async def Instances(
        self, request: pb.AuditInstancesRequest, context: Context
    ) -> pb.AuditInstancesResponse:
        return pb.AuditInstancesResponse(
            instances=[instance_message(i) for i in await self._source.instances()]
        )


def entry_message(entry: AuditEntry) -> pb.AuditLogEntry:
    return pb.AuditLogEntry(
        seq=entry.seq,
        at=entry.at,
        actor=entry.actor,
        action=entry.action,
        subject=entry.subject,
        detail_json=json.dumps(dict(entry.detail), sort_keys=True),
        hash=entry.hash,
    )


def instance_message(instance: InstanceRecord) -> pb.AuditInstance:
    return pb.AuditInstance(
        instance_id=instance.instance_id,
        deployment=instance.deployment,
        platform=instance.platform,
        public_key=instance.public_key,
        enrolled_at=instance.enrolled_at.isoformat(),
    )
