"""The audit log read over ``--admin``: the admin TCP listener, with a ``custodian admin-cert`` certificate.

An ``AuditSource`` like the ledger file's (``custodian.audit_stream``), so the
console checks the chain and writes exports exactly as it does on the host.
What arrives is parsed at the boundary: an entry whose detail is not a JSON
object of strings, integers and booleans is refused, and the chain check
refuses anything else that was altered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
import grpc.aio

from custodian.audit import AuditEntry
from custodian.authority import CUSTODIAN_TLS_NAME
from custodian.console import RemoteAdmin
from custodian.errors import ConsoleError, LedgerError
from custodian.ledger import InstanceRecord
from protos import custos_pb2 as pb
from protos import custos_pb2_grpc as pb_grpc

# Largest message read: an entry as large as any the ledger ever held (1 MiB) and room.
MAX_MESSAGE_BYTES = 16 << 20
INSTANCES_TIMEOUT = 60.0


class RemoteAudit:
    """The custodian's audit log through its admin listener; use inside ``async with``."""

    def __init__(self, remote: RemoteAdmin) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=remote.custodian_ca_pem,
            private_key=remote.key_pem,
            certificate_chain=remote.certificate_pem,
        )
        options: list[tuple[str, Any]] = [
            ("grpc.ssl_target_name_override", CUSTODIAN_TLS_NAME),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self._address = remote.address
        self._channel = grpc.aio.secure_channel(remote.address, credentials, options=options)
        self._stub = pb_grpc.AuditLogStub(self._channel)

    async def __aenter__(self) -> RemoteAudit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close(None)

    async def entries(self, *, after: int = 0) -> AsyncIterator[AuditEntry]:
        try:
            async for message in self._stub.Entries(pb.AuditEntriesRequest(after_seq=after)):
                yield _entry(message)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    async def instances(self) -> list[InstanceRecord]:
        try:
            reply = await self._stub.Instances(pb.AuditInstancesRequest(), timeout=INSTANCES_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return [_instance(i) for i in reply.instances]

    def _error(self, exc: grpc.aio.AioRpcError) -> ConsoleError:
        details = exc.details() or exc.code().name
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            return ConsoleError(f"the custodian at {self._address} is not answering: {details}")
        return ConsoleError(details)


def _entry(message: pb.AuditLogEntry) -> AuditEntry:
    try:
        detail = json.loads(message.detail_json)
    except ValueError:
        detail = None
    if not isinstance(detail, dict) or not all(isinstance(v, str | int | bool) for v in detail.values()):
        raise LedgerError(f"audit entry {message.seq} arrived with a malformed detail")
    return AuditEntry(
        seq=message.seq,
        at=message.at,
        actor=message.actor,
        action=message.action,
        subject=message.subject,
        detail=detail,
        hash=message.hash,
    )


def _instance(message: pb.AuditInstance) -> InstanceRecord:
    try:
        enrolled_at = datetime.fromisoformat(message.enrolled_at)
    except ValueError:
        raise LedgerError(f"instance {message.instance_id} arrived with a malformed enrolment time") from None
    return InstanceRecord(
        instance_id=message.instance_id,
        deployment=message.deployment,
        platform=message.platform,
        public_key=message.public_key,
        enrolled_at=enrolled_at,
        last_seen=enrolled_at,
        last_seq=0,
    )
