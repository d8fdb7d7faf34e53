"""OffLoop: calls made while the loop is busy run together in one worker thread, each answered on its own."""

from __future__ import annotations

import asyncio
import threading

import pytest

from custodian.offload import OffLoop


def test_calls_run_off_the_loop_in_batches_and_each_gets_its_own_outcome() -> None:
    threads: set[int] = set()
    batches: list[int] = []

    def square(x: int) -> int:
        threads.add(threading.get_ident())
        if x == 3:
            raise ValueError("three")
        return x * x

    async def scenario() -> None:
        offloop = OffLoop(square)
        original = offloop._apply

        def counted(args: list[int]) -> list[tuple[int | None, Exception | None]]:
            batches.append(len(args))
            return original(args)

        offloop._apply = counted  # type: ignore[method-assign]
        outcomes = await asyncio.gather(*(offloop(x) for x in range(6)), return_exceptions=True)
        assert outcomes[:3] == [0, 1, 4]
        assert outcomes[4:] == [16, 25]
        assert isinstance(outcomes[3], ValueError)
        assert threading.get_ident() not in threads
        assert batches == [6]
        # Later calls start a new batch.
        assert await offloop(7) == 49

    asyncio.run(scenario())


def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    release = threading.Event()

    def slow(x: int) -> int:
        release.wait(5)
        return x

    async def scenario() -> None:
        offloop = OffLoop(slow)
        first, second = asyncio.ensure_future(offloop(1)), asyncio.ensure_future(offloop(2))
        await asyncio.sleep(0.05)
        first.cancel()
        release.set()
        assert await second == 2
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(scenario())
