"""The control bus: which instances hold a ``Watch`` stream open, and waking them on changes.

Admin actions that change a deployment's leases or suspension call
``notify(deployment)``; every open stream of that deployment wakes up, reads
its instance's current lease and pushes it. Notifications coalesce: a stream
that is busy sending sees one wake-up for several changes, never a stale value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def heartbeat_interval(offline_grace_seconds: int) -> float:
    """Seconds between heartbeats: ``max(1, min(5, grace / 3))``."""
    return max(1.0, min(5.0, offline_grace_seconds / 3))


@dataclass(eq=False)
class Subscription:
    instance_id: str
    deployment: str
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, seconds: float) -> bool:
        """True when a change came within ``seconds``, False when the time ran out."""
        if not self._changed.is_set():
            try:
                await asyncio.wait_for(self._changed.wait(), seconds)
            except TimeoutError:
                return False
        self._changed.clear()
        return True

    def wake(self) -> None:
        self._changed.set()


class ControlBus:
    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    @contextmanager
    def subscribe(self, instance_id: str, deployment: str) -> Iterator[Subscription]:
        subscription = Subscription(instance_id, deployment)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    def notify(self, deployment: str) -> None:
        for subscription in self._subscriptions:
            if subscription.deployment == deployment:
                subscription.wake()

    def notify_all(self) -> None:
        """Wake every stream: after a gap in what this bus heard (a replica's listener reconnected)."""
        for subscription in self._subscriptions:
            subscription.wake()

    def connected(self, instance_id: str) -> bool:
        return any(s.instance_id == instance_id for s in self._subscriptions)

    @property
    def streams(self) -> int:
        return len(self._subscriptions)
