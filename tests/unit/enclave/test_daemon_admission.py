"""Bounded pools: past the workers and the waiting bound, a call is refused at once as busy."""

from __future__ import annotations

import asyncio
import threading

import pytest

from enclave._daemon.admission import BoundedPool
from enclave._daemon.errors import BusyError


def test_calls_past_the_bound_are_refused_and_admitted_again_once_one_finishes() -> None:
    release = threading.Event()

    async def run() -> None:
        pool = BoundedPool("decode", workers=1, waiting=1)
        try:
            held = [asyncio.ensure_future(pool.run(release.wait, 30)) for _ in range(2)]
            await asyncio.sleep(0)
            assert pool.admitted == 2
            with pytest.raises(BusyError, match=r"enclave is busy \(decode\)"):
                await pool.run(lambda: "never")
            release.set()
            assert await asyncio.gather(*held) == [True, True]
            assert await pool.run(lambda: "again") == "again"
            assert pool.admitted == 0
        finally:
            release.set()
            pool.shutdown()

    asyncio.run(run())


def test_a_failing_call_gives_its_place_back() -> None:
    async def run() -> None:
        pool = BoundedPool("attest", workers=1, waiting=0)

        def fail() -> None:
            raise ValueError("boom")

        try:
            with pytest.raises(ValueError, match="boom"):
                await pool.run(fail)
            assert pool.admitted == 0
            assert await pool.run(lambda: 1) == 1
        finally:
            pool.shutdown()

    asyncio.run(run())
