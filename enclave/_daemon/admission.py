"""Bounded worker pools: CPU work on behalf of callers, refused at once when too much is waiting.

An unauthenticated caller can send work that costs CPU before it costs quota
(decoding an image, producing evidence). Each kind of work gets a pool of its
own, so one kind cannot starve the others, and a bound on the calls waiting
for that pool, so a flood is refused with ``BusyError`` instead of queueing
without end behind the legitimate calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from enclave._daemon.errors import BusyError, GenerationsBusyError

T = TypeVar("T")


class BoundedPool:
    """``workers`` threads; at most ``workers + waiting`` calls admitted at a time."""

    def __init__(self, name: str, *, workers: int, waiting: int) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._capacity = workers + waiting
        self.admitted = 0

    async def run(self, work: Callable[..., T], *args: object) -> T:
        if self.admitted >= self._capacity:
            raise BusyError(self.name)
        self.admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)
        finally:
            self.admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class StreamSlots:
    """At most ``running`` generations at once, ``waiting`` more queued in order, the rest refused.

    A generation holds its slot from before it reserves quota to its last token: the queue
    holds calls, never reserved units.
    """

    def __init__(self, *, running: int, waiting: int) -> None:
        self.running_limit = running
        self.waiting_limit = waiting
        self._slots = asyncio.Semaphore(running)
        self.admitted = 0
        self.active = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.admitted >= self.running_limit + self.waiting_limit:
            raise GenerationsBusyError(self.running_limit, self.waiting_limit)
        self.admitted += 1
        try:
            async with self._slots:
                self.active += 1
                try:
                    yield
                finally:
                    self.active -= 1
        finally:
            self.admitted -= 1
