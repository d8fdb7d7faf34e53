"""The local lease: arithmetic (property-tested), concurrency, refusals."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave._daemon.errors import (
    CustodianOfflineError,
    LeaseRevokedError,
    QuotaExhaustedError,
    SuspendedError,
)
from enclave._daemon.lease import Lease, LeaseTerms
from enclave.receipts import TokenCounts


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def terms(limit: int, *, lease_id: str = "L1", valid_for: float = 30, suspended: bool = False) -> LeaseTerms:
    return LeaseTerms(
        lease_id=lease_id, limit=limit, valid_for=valid_for, suspended=suspended, deployment_balance=7
    )


def new_lease(limit: int, *, topup_wait: float = 0.0) -> tuple[Lease, FakeClock]:
    clock = FakeClock()
    lease = Lease(topup_wait=topup_wait, clock=clock)
    lease.apply(terms(limit))
    return lease, clock


async def try_reserve(lease: Lease) -> bool:
    try:
        await lease.reserve()
    except QuotaExhaustedError:
        return False
    return True


operations = st.lists(
    st.one_of(
        st.just(("reserve", 0)),
        st.just(("commit", 0)),
        st.just(("refund", 0)),
        st.tuples(st.just("limit"), st.integers(0, 12)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(initial=st.integers(0, 12), ops=operations)
def test_arithmetic_never_serves_past_the_limit(initial: int, ops: list[tuple[str, int]]) -> None:
    async def run() -> None:
        lease, _ = new_lease(initial)
        limit, committed, outstanding = initial, 0, 0
        for op, value in ops:
            if op == "reserve":
                took = await try_reserve(lease)
                assert took == (committed + outstanding < limit)
                outstanding += took
            elif op == "commit" and outstanding:
                outstanding -= 1
                if committed < limit:
                    lease.commit()
                    committed += 1
                else:
                    with pytest.raises(LeaseRevokedError):
                        lease.commit()
            elif op == "refund" and outstanding:
                lease.refund()
                outstanding -= 1
            elif op == "limit":
                lease.apply(terms(value))
                limit = value
            assert (lease.committed, lease.reserved, lease.limit) == (committed, outstanding, limit)
            assert lease.remaining == max(0, limit - committed - outstanding)

    asyncio.run(run())


def test_commit_or_refund_without_reservation_is_a_bug() -> None:
    lease, _ = new_lease(3)
    with pytest.raises(RuntimeError):
        lease.commit()
    with pytest.raises(RuntimeError):
        lease.refund()


def test_many_concurrent_callers_get_exactly_the_limit() -> None:
    async def run() -> None:
        lease, _ = new_lease(10, topup_wait=0.05)

        async def call() -> bool:
            if not await try_reserve(lease):
                return False
            await asyncio.sleep(0)
            lease.commit()
            return True

        results = await asyncio.gather(*(call() for _ in range(50)))
        assert sum(results) == 10
        assert (lease.committed, lease.reserved) == (10, 0)
        assert lease.topup_wanted.is_set()

    asyncio.run(run())


def test_waiting_caller_takes_a_top_up() -> None:
    async def run() -> None:
        lease, _ = new_lease(1, topup_wait=30)
        await lease.reserve()
        lease.commit()
        waiter = asyncio.ensure_future(lease.reserve())
        await asyncio.sleep(0)
        assert lease.topup_wanted.is_set()
        assert not waiter.done()
        lease.apply(terms(3))
        await waiter
        assert (lease.committed, lease.reserved) == (1, 1)

    asyncio.run(run())


def test_waiting_caller_takes_a_refunded_unit() -> None:
    async def run() -> None:
        lease, _ = new_lease(1, topup_wait=30)
        await lease.reserve()
        waiter = asyncio.ensure_future(lease.reserve())
        await asyncio.sleep(0)
        lease.refund()
        await waiter
        lease.commit()
        assert lease.committed == 1

    asyncio.run(run())


def test_suspension_refuses_waiting_and_new_callers_and_in_flight_commits() -> None:
    async def run() -> None:
        lease, _ = new_lease(1, topup_wait=30)
        await lease.reserve()
        waiter = asyncio.ensure_future(lease.reserve())
        await asyncio.sleep(0)
        lease.heartbeat(30, suspended=True)
        with pytest.raises(SuspendedError):
            await waiter
        with pytest.raises(SuspendedError):
            lease.commit()
        with pytest.raises(SuspendedError):
            await lease.reserve()
        assert (lease.committed, lease.reserved) == (0, 0)

    asyncio.run(run())


def test_offline_past_the_deadline_and_back_on_contact() -> None:
    async def run() -> None:
        lease, clock = new_lease(5)
        clock.now += 29.9
        await lease.reserve()
        lease.commit()
        clock.now += 0.1
        with pytest.raises(CustodianOfflineError, match="custodian unreachable past the offline grace"):
            await lease.reserve()
        lease.heartbeat(30, suspended=False)
        await lease.reserve()

    asyncio.run(run())


def test_no_contact_yet_means_offline() -> None:
    async def run() -> None:
        with pytest.raises(CustodianOfflineError):
            await Lease(topup_wait=0, clock=FakeClock()).reserve()

    asyncio.run(run())


def test_exhausted_without_top_up_is_refused() -> None:
    async def run() -> None:
        lease, _ = new_lease(0, topup_wait=0.01)
        with pytest.raises(QuotaExhaustedError):
            await lease.reserve()
        assert lease.topup_wanted.is_set()

    asyncio.run(run())


def test_a_new_lease_starts_its_own_count() -> None:
    lease, _ = new_lease(5)
    asyncio.run(lease.reserve())
    lease.commit()
    lease.apply(terms(4, lease_id="L2"))
    assert (lease.lease_id, lease.committed, lease.limit, lease.deployment_balance) == ("L2", 0, 4, 7)
    # The replaced lease's count waits for the usage reporter; nothing served is dropped.
    assert lease.retired == [("L1", 1, None)]


def test_a_top_up_answered_from_an_empty_balance_refuses_at_once() -> None:
    async def run() -> None:
        lease, _ = new_lease(0, topup_wait=5)
        waiter = asyncio.ensure_future(lease.reserve())
        await asyncio.sleep(0)
        assert lease.topup_wanted.is_set()
        lease.apply(LeaseTerms(lease_id="L1", limit=0, valid_for=30, suspended=False, deployment_balance=0))
        lease.topup_answered()
        with pytest.raises(QuotaExhaustedError):
            await waiter

    asyncio.run(run())


def test_a_top_up_that_others_took_is_asked_again_while_the_balance_lasts() -> None:
    async def run() -> None:
        lease, _ = new_lease(0, topup_wait=5)
        waiter = asyncio.ensure_future(lease.reserve())
        await asyncio.sleep(0)
        assert lease.topup_wanted.is_set()
        lease.topup_wanted.clear()
        lease.topup_answered()  # answered, no room, but the deployment has a balance of 7
        for _ in range(20):
            await asyncio.sleep(0)
        assert lease.topup_wanted.is_set()
        lease.apply(terms(1))
        await waiter
        assert lease.reserved == 1

    asyncio.run(run())


def test_silence_suspension_and_closing_are_tracked_for_zeroization() -> None:
    lease, clock = new_lease(5)
    clock.now += 7
    assert (lease.silent_for, lease.suspended_for) == (7, 0)
    lease.heartbeat(30, True)
    clock.now += 3
    assert (lease.silent_for, lease.suspended_for) == (3, 3)
    lease.heartbeat(30, True)
    assert lease.suspended_for == 3
    lease.heartbeat(30, False)
    assert lease.suspended_for == 0
    lease.close()
    with pytest.raises(CustodianOfflineError):
        asyncio.run(lease.reserve())


def test_a_top_up_is_asked_for_at_half_the_lease_once_at_a_time() -> None:
    async def run() -> None:
        lease, _ = new_lease(10)
        lease.topup_size = 10
        for _ in range(4):
            await lease.reserve()
            lease.commit()
        assert not lease.topup_wanted.is_set()  # 6 left: above the low-water mark
        await lease.reserve()
        lease.commit()
        assert lease.topup_wanted.is_set()  # 5 left: ask, before anyone has to wait
        lease.topup_wanted.clear()
        lease.topup_requested()
        await lease.reserve()
        assert not lease.topup_wanted.is_set()  # one request in flight is enough
        lease.commit()
        lease.apply(terms(16))  # the answer: limit - used back to the lease size
        lease.topup_answered()
        assert lease.remaining == 10
        assert not lease.topup_wanted.is_set()

    asyncio.run(run())


def test_no_early_top_up_when_the_balance_is_empty_or_the_lease_full() -> None:
    async def run() -> None:
        lease, _ = new_lease(10)
        lease.topup_size = 10
        lease.apply(LeaseTerms(lease_id="L1", limit=10, valid_for=30, suspended=False, deployment_balance=0))
        for _ in range(6):
            await lease.reserve()
            lease.commit()
        assert not lease.topup_wanted.is_set()  # nothing to ask for
        full, _ = new_lease(4)
        full.topup_size = 4
        for _ in range(3):
            await full.reserve()  # in flight, not committed: a top-up cannot add to a full lease
        assert not full.topup_wanted.is_set()

    asyncio.run(run())


def test_a_generation_reserves_many_units_or_what_the_lease_can_cover() -> None:
    async def run() -> None:
        lease, _ = new_lease(10)
        lease.count_tokens()
        assert await lease.reserve(6) == 6
        # 4 left; no top-up can come (answered: empty balance), so it takes what is there.
        lease.deployment_balance = 0
        lease.topup_answered()
        assert await lease.reserve(8, at_least=3) == 4
        with pytest.raises(QuotaExhaustedError):
            await lease.reserve(2, at_least=1)
        lease.settle(6, TokenCounts(prompt=3, completion=2))
        lease.settle(4, TokenCounts(prompt=3, completion=0))
        assert (lease.committed, lease.reserved, lease.tokens) == (8, 0, TokenCounts(6, 2))
        with pytest.raises(QuotaExhaustedError):
            await lease.reserve(5, at_least=3)  # 2 left, fewer than the prompt and one token
        assert lease.reserved == 0

    asyncio.run(run())


def test_a_cut_lease_no_longer_covers_the_streams_in_flight() -> None:
    async def run() -> None:
        lease, _ = new_lease(10)
        await lease.reserve(8)
        assert lease.covers()
        lease.apply(terms(5))  # a revoke reached the enclave
        assert not lease.covers()
        lease.settle(8, TokenCounts(prompt=4, completion=2))  # what was sent while covered counts
        assert (lease.committed, lease.reserved) == (6, 0)
        lease.heartbeat(30, True)
        assert not lease.covers()

    asyncio.run(run())
