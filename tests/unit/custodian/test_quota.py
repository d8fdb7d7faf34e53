"""Quota arithmetic: each operation by example, bad inputs, and the invariant under any sequence."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custodian import quota
from custodian.config import MAX_GRANT_UNITS
from custodian.errors import InvalidRequestError
from custodian.quota import Account, Allotment


def _invariant(account: Account, allotments: list[Allotment]) -> None:
    assert account.granted - account.revoked + account.overdrawn == account.balance + sum(
        a.limit for a in allotments
    )
    assert account.balance >= 0
    assert all(0 <= a.used <= a.limit <= a.peak for a in allotments)
    assert account.used == sum(a.used for a in allotments)


def test_grant_adds_to_the_balance_it_never_overwrites() -> None:
    account = quota.grant(quota.grant(Account(), 10), 5)
    assert (account.balance, account.granted) == (15, 15)


@pytest.mark.parametrize("units", [0, -1, MAX_GRANT_UNITS + 1], ids=["zero", "negative", "over-max"])
def test_grant_refuses_out_of_bounds_units(units: int) -> None:
    with pytest.raises(InvalidRequestError):
        quota.grant(Account(), units)


@pytest.mark.parametrize(
    ("balance", "size", "limit"),
    [(100, 30, 30), (20, 30, 20), (0, 30, 0), (100, 0, 0)],
    ids=["enough", "short", "empty", "suspended"],
)
def test_open_takes_at_most_the_lease_size_from_the_balance(balance: int, size: int, limit: int) -> None:
    account, allotment = quota.open_allotment(Account(balance=balance, granted=balance), size)
    assert allotment == Allotment(limit=limit, peak=limit, used=0)
    assert account.balance == balance - limit


def test_top_up_brings_unused_units_back_to_the_lease_size() -> None:
    account, allotment = quota.top_up(Account(balance=50, granted=80), Allotment(30, 30, 25), 30)
    assert allotment == Allotment(limit=55, peak=55, used=25)
    assert account.balance == 25


def test_top_up_never_takes_more_than_the_balance() -> None:
    account, allotment = quota.top_up(Account(balance=3, granted=33), Allotment(30, 30, 30), 30)
    assert (allotment.limit, account.balance) == (33, 0)


@pytest.mark.parametrize(
    ("allotment", "used"),
    [(Allotment(10, 10, 5), 4), (Allotment(10, 10, 5), 11), (Allotment(4, 10, 4), 11)],
    ids=["backwards", "above-limit", "above-peak-after-cut"],
)
def test_record_use_refuses_impossible_usage(allotment: Allotment, used: int) -> None:
    with pytest.raises(InvalidRequestError):
        quota.record_use(Account(balance=100, granted=110), allotment, used)


def test_usage_after_a_cut_is_counted_and_taken_from_the_balance_then_overdrawn() -> None:
    # A revoke cut the lease to 4 used units; the enclave had served 9 before it heard.
    account, allotment = quota.record_use(
        Account(balance=3, granted=7, revoked=6, used=4), Allotment(4, 10, 4), 9
    )
    assert allotment == Allotment(limit=9, peak=10, used=9)
    assert (account.balance, account.used, account.overdrawn) == (0, 9, 2)


def test_release_returns_the_unused_units() -> None:
    account, allotment = quota.release(Account(balance=0, granted=10, used=4), Allotment(10, 10, 4))
    assert (account.balance, allotment.limit) == (6, 4)


def test_revoke_takes_the_balance_first_then_leases_in_order() -> None:
    account, allotments, changed = quota.revoke(
        Account(balance=5, granted=25), [Allotment(10, 10, 2), Allotment(10, 10, 0)], 15
    )
    assert changed == 15
    assert account.balance == 0
    assert [a.limit for a in allotments] == [2, 8]


def test_revoke_all_empties_balance_and_leases_down_to_their_use() -> None:
    account, allotments, changed = quota.revoke(
        Account(balance=5, granted=25), [Allotment(10, 10, 2), Allotment(10, 10, 7)], None
    )
    assert (changed, account.balance, account.revoked) == (16, 0, 16)
    assert [a.limit for a in allotments] == [2, 7]


def test_revoke_takes_only_what_there_is() -> None:
    _, _, changed = quota.revoke(Account(balance=5, granted=5), [], 50)
    assert changed == 5


_operations = st.lists(
    st.tuples(
        st.sampled_from(["grant", "open", "use", "top_up", "release", "revoke", "revoke_all"]),
        st.integers(min_value=0, max_value=3),
        st.integers(min_value=1, max_value=60),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(_operations)
def test_the_books_always_balance(operations: list[tuple[str, int, int]]) -> None:
    account, allotments = Account(), []
    for op, which, n in operations:
        if op == "grant":
            account = quota.grant(account, n)
        elif op == "open":
            account, allotment = quota.open_allotment(account, n)
            allotments.append(allotment)
        elif op == "revoke" or op == "revoke_all":
            revocable = account.balance + quota.held(allotments)
            account, allotments, changed = quota.revoke(account, allotments, n if op == "revoke" else None)
            assert changed == (min(n, revocable) if op == "revoke" else revocable)
            if op == "revoke_all":
                assert account.balance == quota.held(allotments) == 0
        elif allotments:
            index = which % len(allotments)
            a = allotments[index]
            if op == "use":
                used = min(a.used + n, a.peak)
                account, allotments[index] = quota.record_use(account, a, used)
            elif op == "top_up":
                account, allotments[index] = quota.top_up(account, a, n)
            else:
                account, allotments[index] = quota.release(account, a)
        _invariant(account, allotments)
