"""The enclave listing: every enrolled instance, its link state, its lease and its last receipt.

``state`` is ``connected`` while the instance holds a control stream open
(on this custodian, or among replicas on any replica that refreshed it within
``STREAM_FRESH``: ``replica`` names it),
``stopped`` once its last lease closed with a final report (an instance never
comes back after that: a restarted enclave enrols anew), and ``offline``
otherwise, since ``last_seen``. After a custodian restart every instance is
``offline`` until it reconnects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from custodian.control import ControlBus
from custodian.errors import NotFoundError
from custodian.ledger import InstanceRecord, Ledger, Transaction


@dataclass(frozen=True)
class EnclaveStatus:
    instance_id: str
    deployment: str
    platform: str
    key_sha256: str
    enrolled_at: datetime
    last_seen: datetime
    connected: bool
    state: str
    offline_since: datetime | None
    lease_id: str
    lease_state: str
    lease_limit: int
    lease_used: int
    lease_expires_at: datetime | None
    last_receipt_seq: int
    last_receipt_used: int
    last_receipt_at: datetime | None
    # Among replicas: the one holding its control stream ("" for a single custodian, or none).
    replica: str = ""


# A replica refreshes the streams it holds at every keep-alive (every 5 s at most): one not
# refreshed for two of them and a second is held by no replica (that replica went away).
STREAM_FRESH = timedelta(seconds=11)


class Roster:
    def __init__(self, ledger: Ledger, bus: ControlBus, *, replica: str = "") -> None:
        self._ledger = ledger
        self._bus = bus
        self._replica = replica

    async def enclaves(self, deployment: str | None = None) -> list[EnclaveStatus]:
        async with self._ledger.transaction() as tx:
            if deployment and await tx.deployment(deployment) is None:
                raise NotFoundError(f"no deployment {deployment!r}")
            streams = await tx.streams()
            return [await self._status(tx, i, streams) for i in await tx.instances(deployment or None)]

    async def _status(
        self, tx: Transaction, instance: InstanceRecord, streams: dict[str, tuple[str, datetime]]
    ) -> EnclaveStatus:
        lease = await tx.latest_lease(instance.instance_id)
        receipt = await tx.receipt(instance.instance_id, instance.last_seq) if instance.last_seq else None
        here = self._bus.connected(instance.instance_id)
        held = streams.get(instance.instance_id)
        elsewhere = held is not None and held[0] != self._replica and tx.now - held[1] <= STREAM_FRESH
        connected = here or elsewhere
        replica = self._replica if here else held[0] if held is not None and elsewhere else ""
        if connected:
            state = "connected"
        elif lease is not None and lease.state == "closed":
            state = "stopped"
        else:
            state = "offline"
        return EnclaveStatus(
            instance_id=instance.instance_id,
            deployment=instance.deployment,
            platform=instance.platform,
            key_sha256=instance.key_sha256,
            enrolled_at=instance.enrolled_at,
            last_seen=instance.last_seen,
            connected=connected,
            state=state,
            offline_since=None if connected else instance.last_seen,
            lease_id=lease.lease_id if lease else "",
            lease_state=lease.state if lease else "",
            lease_limit=lease.units.limit if lease else 0,
            lease_used=lease.units.used if lease else 0,
            lease_expires_at=lease.expires_at if lease and lease.active else None,
            last_receipt_seq=receipt.seq if receipt else 0,
            last_receipt_used=receipt.used if receipt else 0,
            last_receipt_at=receipt.received_at if receipt else None,
            replica=replica,
        )
