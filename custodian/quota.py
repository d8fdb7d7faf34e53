"""Quota arithmetic, pure: a deployment's account and the allotments of its leases.

Every operation returns new values and keeps one invariant, which the ledger
relies on and the tests check for arbitrary sequences of operations:

    granted - revoked + overdrawn == balance + sum(limit of every allotment)

An allotment's ``limit`` is what its lease may use in total; once the lease is
closed or expired its limit is cut down to what it used, so the units it held
count again in the balance. ``peak`` is the highest limit the enclave was ever
told; usage up to it is accepted even after a revoke or an expiry cut the limit
(the enclave may have served those units before it heard of the cut). Such an
overrun is taken from the balance as far as it goes; the rest is ``overdrawn``,
so every inference the enclave served is counted.

A lease that expires without its final receipt is charged in full: its unused
units do not return, and ``unreported`` records how many of them no receipt
covers (the declared worst case). A receipt that arrives later settles it: the
proven usage replaces the charge and the difference returns to the balance.
``used`` counts only what receipts prove; ``used + unreported`` is what the
deployment has been charged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from custodian.config import MAX_GRANT_UNITS
from custodian.errors import InvalidRequestError

# Granted units in total stay below this, far inside SQLite's signed 64-bit integers.
MAX_TOTAL_UNITS = 1 << 62


@dataclass(frozen=True)
class Account:
    """A deployment's quota: free balance and running totals."""

    balance: int = 0
    granted: int = 0
    revoked: int = 0
    used: int = 0
    overdrawn: int = 0
    # Units charged for expired leases beyond what their receipts prove.
    unreported: int = 0

    @property
    def charged(self) -> int:
        return self.used + self.unreported


@dataclass(frozen=True)
class Allotment:
    """The units of one lease."""

    limit: int
    peak: int
    used: int
    # Units charged at expiry without a receipt (limit - used then); 0 once settled.
    unreported: int = 0

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def grant(account: Account, units: int) -> Account:
    _check_units(units)
    if account.granted + units > MAX_TOTAL_UNITS:
        raise InvalidRequestError("grant would take the deployment's total past the supported maximum")
    return replace(account, balance=account.balance + units, granted=account.granted + units)


def open_allotment(account: Account, size: int) -> tuple[Account, Allotment]:
    """A new allotment of ``min(size, balance)`` units taken from the balance (size 0 while suspended)."""
    units = min(size, account.balance)
    return replace(account, balance=account.balance - units), Allotment(limit=units, peak=units, used=0)


def top_up(account: Account, allotment: Allotment, size: int) -> tuple[Account, Allotment]:
    """Bring the allotment's unused units up to ``size`` at most, from the balance."""
    units = min(max(0, size - allotment.remaining), account.balance)
    limit = allotment.limit + units
    return (
        replace(account, balance=account.balance - units),
        replace(allotment, limit=limit, peak=max(allotment.peak, limit)),
    )


def record_use(account: Account, allotment: Allotment, used: int) -> tuple[Account, Allotment]:
    """Record cumulative usage ``used`` for the allotment; it may not go backwards or past the peak."""
    if used < allotment.used:
        raise InvalidRequestError(f"usage went backwards: {used} after {allotment.used}")
    if used > allotment.peak:
        raise InvalidRequestError(f"usage {used} is above the lease limit {allotment.peak}")
    overrun = max(0, used - allotment.limit)
    covered = min(overrun, account.balance)
    account = replace(
        account,
        balance=account.balance - covered,
        used=account.used + used - allotment.used,
        overdrawn=account.overdrawn + overrun - covered,
    )
    return account, replace(allotment, limit=max(allotment.limit, used), used=used)


def release(account: Account, allotment: Allotment) -> tuple[Account, Allotment]:
    """Close the allotment: its unused units go back to the balance."""
    return (
        replace(account, balance=account.balance + allotment.remaining),
        replace(allotment, limit=allotment.used),
    )


def expire(account: Account, allotment: Allotment) -> tuple[Account, Allotment]:
    """The lease expired without its final receipt: its unused units are charged, none return."""
    unreported = allotment.remaining
    return (
        replace(account, unreported=account.unreported + unreported),
        replace(allotment, unreported=unreported),
    )


def settle(account: Account, allotment: Allotment, used: int) -> tuple[Account, Allotment]:
    """A receipt for a lease that is no longer active: record ``used``, then release what it did not use.

    For an expired lease this replaces the charge of its unreported remainder by
    the proven usage; for a closed one anything past its limit is an overrun.
    """
    account, allotment = record_use(account, allotment, used)
    account = replace(account, unreported=account.unreported - allotment.unreported)
    return release(account, replace(allotment, unreported=0))


def revoke(
    account: Account, allotments: Sequence[Allotment], units: int | None
) -> tuple[Account, list[Allotment], int]:
    """Take ``units`` back (``None``: everything), from the balance first, then from the allotments.

    Allotments give up their unused units in the order given. Returns the new
    account, the new allotments in the same order, and the units taken.
    """
    if units is not None:
        _check_units(units)
    wanted = account.balance + sum(a.remaining for a in allotments) if units is None else units
    from_balance = min(wanted, account.balance)
    left = wanted - from_balance
    result: list[Allotment] = []
    for allotment in allotments:
        taken = min(left, allotment.remaining)
        left -= taken
        result.append(replace(allotment, limit=allotment.limit - taken))
    changed = wanted - left
    account = replace(account, balance=account.balance - from_balance, revoked=account.revoked + changed)
    return account, result, changed


def held(allotments: Sequence[Allotment]) -> int:
    """Units held by leases and not used yet."""
    return sum(a.remaining for a in allotments)


def _check_units(units: int) -> None:
    if not 0 < units <= MAX_GRANT_UNITS:
        raise InvalidRequestError(f"units must be between 1 and {MAX_GRANT_UNITS}, got {units}")
