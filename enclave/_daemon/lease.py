"""The local quota: the enclave's lease from the custodian, counted call by call.

Each inference reserves one unit before it runs, commits it on success and is
refunded on failure. ``committed + reserved`` never exceeds ``limit`` when a
unit is reserved, and a commit is refused when the custodian took the unit
back meanwhile (a revoke shrank the limit, or the deployment was suspended),
so no number of concurrent calls serves more than the lease allows.

The lease dies without contact: every message from the custodian moves the
offline deadline to ``now + valid_for``; past it, calls are refused.
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
        self.valid_for = 0.0
        # Offline until the custodian first speaks.
        self._deadline = clock()
        # Set when a caller found the lease exhausted; the usage reporter asks for a top-up.
        self.topup_wanted = asyncio.Event()
        self._changed = asyncio.Event()

    # ---------------------------------------------------------------- state

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.committed - self.reserved)

    @property
    def offline(self) -> bool:
        return self._clock() >= self._deadline

    # ------------------------------------------------------- from custodian

    def apply(self, terms: LeaseTerms) -> None:
        """A ``Lease`` from the custodian: new limit, suspension, balance, deadline."""
        if terms.lease_id != self.lease_id:
            if self.lease_id:
                logger.warning(
                    "custodian replaced lease %s (%d units committed) by %s",
                    self.lease_id,
                    self.committed,
                    terms.lease_id,
                )
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
        self._deadline = self._clock() + valid_for
        self._notify()

    def _set_suspended(self, suspended: bool) -> None:
        if suspended != self.suspended:
            logger.warning("deployment %s", "suspended" if suspended else "resumed")
        self.suspended = suspended

    # ------------------------------------------------------------ per call

    async def reserve(self) -> None:
        """Take one unit, asking for a top-up and waiting up to ``topup_wait`` when none is left."""
        deadline: float | None = None
        while True:
            self._check_open()
            if self.committed + self.reserved < self.limit:
                self.reserved += 1
                return
            if deadline is None:
                deadline = self._clock() + self._topup_wait
                self.topup_wanted.set()
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise QuotaExhaustedError()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
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

    def refund(self) -> None:
        """The call failed: its reserved unit is free again."""
        self._release()

    def _release(self) -> None:
        if self.reserved <= 0:
            raise RuntimeError("lease: commit or refund without a reservation")
        self.reserved -= 1
        self._notify()

    def _check_open(self) -> None:
        if self.suspended:
            raise SuspendedError()
        if self.offline:
            raise CustodianOfflineError()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
