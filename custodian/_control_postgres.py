"""Control pushes between replicas: PostgreSQL's LISTEN/NOTIFY feeding this replica's control bus.

``grant``, ``revoke``, ``suspend`` and ``resume`` notify the deployment's name
in the transaction that makes the change (``Transaction.notify``): PostgreSQL
delivers it at commit to every listening session, never for a rollback. Each
replica keeps one connection of its own listening (not the ledger's, which
runs transactions) and wakes the streams of that deployment on its bus; they
read the instance's lease afresh and push it, within a second of the commit
whichever replica took it.

A lost listening connection is opened again (after ``RETRY_SECONDS``); since
notifications sent meanwhile are lost, every stream is woken once it is back,
and reads the current state. The streams' own heartbeats (every 1-5 s) read
the state too, so a replica cut off from notifications still catches up.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from custodian._ledger_postgres import CONNECT_TIMEOUT_SECONDS, CONTROL_CHANNEL, redact
from custodian.control import ControlBus

logger = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
_LOST = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class ControlListener:
    """Listens on ``CONTROL_CHANNEL`` for as long as it runs (``start``, ``stop``)."""

    def __init__(self, url: str, bus: ControlBus) -> None:
        self._url = url
        self._bus = bus
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self._listen()
            except _LOST as exc:
                if not failing:
                    logger.warning(
                        "control notifications from %s lost (%s); reconnecting every %.0f s",
                        redact(self._url),
                        type(exc).__name__,
                        RETRY_SECONDS,
                    )
                failing = True
            else:
                failing = False
            self.listening.clear()
            await asyncio.sleep(RETRY_SECONDS)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT_SECONDS)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _: lost.set())
            await conn.add_listener(CONTROL_CHANNEL, self._heard)
            self.listening.set()
            logger.info("listening for control notifications")
            # Whatever was notified while nobody listened: every stream reads its state again.
            self._bus.notify_all()
            await lost.wait()
            raise ConnectionError("the listening connection was closed")
        finally:
            if not conn.is_closed():
                conn.terminate()

    def _heard(self, _conn: object, _pid: int, _channel: str, deployment: object) -> None:
        self._bus.notify(str(deployment))
