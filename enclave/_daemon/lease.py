"""The local quota: the enclave's lease from the custodian, counted call by call.

Each inference reserves one unit before it runs, commits it on success and is
refunded on failure. ``committed + reserved`` never exceeds ``limit`` when a
unit is reserved, and a commit is refused when the custodian took the unit
back meanwhile (a revoke shrank the limit, or the deployment was suspended),
so no number of concurrent calls serves more than the lease allows.

The lease dies without contact: every message from the custodian moves the
offline deadline to ``now + valid_for``; past it, calls are refused.

When the custodian replaces the lease (the old one closed or expired), the old
lease's final count is kept in ``retired`` until the usage reporter has sent
it: no unit served is ever dropped from the reports. ``silent_for`` and
``suspended_for`` tell the daemon when to zeroize; ``close`` refuses every
call from then on.

Top-ups are asked for ahead of need: once a commit leaves at most half of
``topup_size`` (the deployment's lease size, set by the link) uncommitted, the
usage reporter is woken to ask for more, at most one request in flight, and
only while a top-up can bring something (the deployment has a balance and the
lease is not already full). A call that finds the lease empty asks as well,
and waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from enclave._daemon.errors import (
    CustodianOfflineError,
    LeaseRevokedError,
    QuotaExhaustedError,
    SuspendedError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseTerms:
    """What the custodian says about this instance's lease (a ``Lease`` message)."""

    lease_id: str
    limit: int
    valid_for: float
    suspended: bool
    deployment_balance: int


class Lease:
    def __init__(self, *, topup_wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._topup_wait = topup_wait
        self.lease_id = ""
        self.limit = 0
        self.committed = 0
        self.reserved = 0
        self.suspended = False
        self.deployment_balance = 0
        # Offline until the custodian first speaks (valid for 0 s from creation).
        self.valid_for = 0.0
        # Set when a caller found the lease exhausted; the usage reporter asks for a top-up.
        self.topup_wanted = asyncio.Event()
        self._changed = asyncio.Event()
        # Leases the custodian replaced, with their final committed count, oldest first.
        self.retired: list[tuple[str, int]] = []
        self._last_contact = clock()
        self._suspended_since: float | None = None
        # How many top-up requests the custodian has answered.
        self._topup_answers = 0
        # The deployment's lease size (0: unknown, ask only when empty) and whether a request is out.
        self.topup_size = 0
        self._topup_in_flight = False
        self.closed = False

    # ---------------------------------------------------------------- state

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.committed - self.reserved)

    @property
    def offline(self) -> bool:
        return self.silent_for >= self.valid_for

    @property
    def silent_for(self) -> float:
        """Seconds since the custodian last spoke (or since the lease was created)."""
        return self._clock() - self._last_contact

    @property
    def suspended_for(self) -> float:
        """Seconds the deployment has been suspended without a break (0 while it is not)."""
        return 0.0 if self._suspended_since is None else self._clock() - self._suspended_since

    # ------------------------------------------------------- from custodian

    def apply(self, terms: LeaseTerms, *, closed: bool = False) -> None:
        """A ``Lease`` from the custodian: new limit, suspension, balance, deadline.

        ``closed``: the answer to this enclave's own final report, which closed the lease; the
        custodian took its final count, and its end is no news worth a warning.
        """
        if closed and terms.lease_id != self.lease_id:
            logger.info("lease %s closed with %d units", self.lease_id, self.committed)
            self.lease_id, self.committed, self.limit = terms.lease_id, 0, terms.limit
        if terms.lease_id != self.lease_id:
            if self.lease_id:
                logger.warning(
                    "custodian replaced lease %s (%d units committed) by %s",
                    self.lease_id,
                    self.committed,
                    terms.lease_id or "none",
                )
                self.retired.append((self.lease_id, self.committed))
            self.lease_id = terms.lease_id
            self.committed = 0
        if terms.limit < self.limit:
            logger.warning("lease limit lowered from %d to %d", self.limit, terms.limit)
        self.limit = terms.limit
        self.deployment_balance = terms.deployment_balance
        self._set_suspended(terms.suspended)
        self.refresh(terms.valid_for)

    def heartbeat(self, valid_for: float, suspended: bool) -> None:
        self._set_suspended(suspended)
        self.refresh(valid_for)

    def refresh(self, valid_for: float) -> None:
        """Contact from the custodian: the lease stays valid ``valid_for`` seconds from now."""
        self.valid_for = valid_for
        self._last_contact = self._clock()
        self._notify()

    def topup_requested(self) -> None:
        """The usage reporter sent a top-up request; no other is asked for until it is answered."""
        self._topup_in_flight = True

    def topup_answered(self) -> None:
        """The custodian answered a top-up request (``apply`` has the new terms already)."""
        self._topup_answers += 1
        self._topup_in_flight = False
        if self.topup_wanted.is_set() and self.remaining > 0 and not self._running_low():
            # Asked for while the answer was on its way, and the answer was enough.
            self.topup_wanted.clear()
        self._notify()

    def topup_dropped(self) -> None:
        """The top-up request was refused for good: another may be asked for."""
        self._topup_in_flight = False

    def _could_grow(self) -> bool:
        """Whether a top-up can bring units: it fills ``limit - used`` up to the lease size."""
        return self.topup_size <= 0 or self.limit - self.committed < self.topup_size

    def _running_low(self) -> bool:
        """Half the lease or less is left uncommitted, and a top-up can bring units.

        Counted without the calls in flight: a top-up fills ``limit - used`` to the lease size, so
        the next one is asked for only after half a lease more was served, however many calls
        are in flight (counting those would ask again at once whenever they reach half a lease).
        """
        return (
            self.topup_size > 0
            and self.deployment_balance > 0
            and self.limit - self.committed <= self.topup_size // 2  # then a top-up can bring units
        )

    def close(self) -> None:
        """Refuse every call from now on (the daemon is zeroizing)."""
        self.closed = True
        self._notify()

    def _set_suspended(self, suspended: bool) -> None:
        if suspended != self.suspended:
            logger.warning("deployment %s", "suspended" if suspended else "resumed")
            self._suspended_since = self._clock() if suspended else None
        self.suspended = suspended

    # ------------------------------------------------------------ per call

    async def reserve(self) -> None:
        """Take one unit, asking for a top-up and waiting up to ``topup_wait`` when none is left.

        Refused at once when the custodian answers a top-up request with nothing
        left in the deployment's balance.
        """
        deadline: float | None = None
        answers = self._topup_answers
        asked = False
        while True:
            self._check_open()
            if self.committed + self.reserved < self.limit:
                self.reserved += 1
                return
            if deadline is None:
                deadline = self._clock() + self._topup_wait
            if self._topup_answers > answers:
                answers, asked = self._topup_answers, False
                if self.deployment_balance == 0:
                    raise QuotaExhaustedError()
            if not asked and self._could_grow():
                # Asked again after each answer, as long as a top-up can bring something; when the
                # lease is full of calls in flight, a commit comes first (and wakes this caller).
                asked = True
                self.topup_wanted.set()
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise QuotaExhaustedError()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                self._check_open()
                if self.committed + self.reserved < self.limit:
                    continue
                raise QuotaExhaustedError() from None

    def commit(self) -> None:
        """The call served: its reserved unit becomes used, unless it was taken back meanwhile."""
        self._release()
        if self.suspended:
            raise SuspendedError()
        if self.committed >= self.limit:
            raise LeaseRevokedError()
        self.committed += 1
        if not self._topup_in_flight and self._running_low():
            self.topup_wanted.set()

    def refund(self) -> None:
        """The call failed: its reserved unit is free again."""
        self._release()

    def _release(self) -> None:
        if self.reserved <= 0:
            raise RuntimeError("lease: commit or refund without a reservation")
        self.reserved -= 1
        self._notify()

    def _check_open(self) -> None:
        if self.closed:
            raise CustodianOfflineError()
        if self.suspended:
            raise SuspendedError()
        if self.offline:
            raise CustodianOfflineError()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
