"""Run a CPU-heavy function off the event loop, many calls to one worker-thread hop.

``OffLoop(fn)`` is awaited like ``fn``; the calls made while the loop is busy
are collected and run together in one worker thread. Meant for functions that
release the GIL while they work (OpenSSL signature checks, hashing), so they
use another core while the event loop goes on serving; one hop per batch keeps
the loop's share of the cost (futures, wake-ups) small. An exception raised by
one call goes to its caller only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar, cast

A = TypeVar("A")
R = TypeVar("R")

# Most calls one hop carries: a long batch would hold its first callers back.
BATCH_LIMIT = 64


class OffLoop(Generic[A, R]):
    def __init__(self, fn: Callable[[A], R]) -> None:
        self._fn = fn
        self._queued: list[tuple[A, asyncio.Future[R]]] = []
        self._running: asyncio.Task[None] | None = None

    async def __call__(self, arg: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queued.append((arg, future))
        if self._running is None:
            self._running = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued[:BATCH_LIMIT], self._queued[BATCH_LIMIT:]
                try:
                    outcomes = await asyncio.to_thread(self._apply, [arg for arg, _ in batch])
                except BaseException:  # cancelled (shutting down): nobody waits forever
                    for _, future in batch:
                        future.cancel()
                    raise
                for (_, future), (result, error) in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller was cancelled
                        continue
                    if error is None:
                        future.set_result(cast(R, result))
                    else:
                        future.set_exception(error)
        finally:
            self._running = None

    def _apply(self, args: list[A]) -> list[tuple[R | None, Exception | None]]:
        outcomes: list[tuple[R | None, Exception | None]] = []
        for arg in args:
            try:
                outcomes.append((self._fn(arg), None))
            except Exception as exc:
                outcomes.append((None, exc))
        return outcomes
