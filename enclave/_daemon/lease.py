"""The local quota: the enclave's lease from the custodian, counted call by call.

Each inference reserves one unit before it runs, commits it on success and is
refunded on failure. A language model's unit is a token: a generation reserves
its prompt plus ``max_tokens`` (or what the lease can cover, at least the
prompt and one token), and ``settle`` counts the tokens it produced and frees
the rest; ``covers`` says, before each token is sent, whether the lease still
backs every reservation (a revoke or a suspension stops the stream).
``committed + reserved`` never exceeds ``limit`` when a unit is reserved,
and a commit is refused when the custodian took the unit back meanwhile (a
revoke shrank the limit, or the deployment was suspended), so no number of
concurrent calls serves more than the lease allows.

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
from typing import NamedTuple

from enclave._daemon.errors import (
    CustodianOfflineError,
    LeaseRevokedError,
    QuotaExhaustedError,
    SuspendedError,
)
from enclave.receipts import TokenCounts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseTerms:
    """What the custodian says about this instance's lease (a ``Lease`` message)."""

    lease_id: str
    limit: int
    valid_for: float
    suspended: bool
    deployment_balance: int


class RetiredLease(NamedTuple):
    """A lease the custodian replaced, with its final count (and tokens, for a language model)."""

    lease_id: str
    used: int
    tokens: TokenCounts | None = None


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
        self.retired: list[RetiredLease] = []
        # A language model's units are tokens, counted apart under the current lease (None: a
        # classifier's calls). Set by the daemon when the model it loads generates text.
        self.tokens: TokenCounts | None = None
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
            self._restart_tokens()
        if terms.lease_id != self.lease_id:
            if self.lease_id:
                logger.warning(
                    "custodian replaced lease %s (%d units committed) by %s",
                    self.lease_id,
                    self.committed,
                    terms.lease_id or "none",
                )
                self.retired.append(RetiredLease(self.lease_id, self.committed, self.tokens))
            self.lease_id = terms.lease_id
            self.committed = 0
            self._restart_tokens()
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

    def count_tokens(self) -> None:
        """The model is a language model: from now on a unit is a token, and receipts say which."""
        self.tokens = TokenCounts()

    def _restart_tokens(self) -> None:
        if self.tokens is not None:
            self.tokens = TokenCounts()

    def _set_suspended(self, suspended: bool) -> None:
        if suspended != self.suspended:
            logger.warning("deployment %s", "suspended" if suspended else "resumed")
            self._suspended_since = self._clock() if suspended else None
        self.suspended = suspended

    # ------------------------------------------------------------ per call

    async def reserve(self, units: int = 1, *, at_least: int | None = None) -> int:
        """Take ``units``, asking for a top-up and waiting up to ``topup_wait`` when they are not there.

        With ``at_least``, settle for what the lease can cover once no top-up can bring more (the
        custodian answered from an empty balance, the lease is as large as leases get, or the
        wait is over), as long as that is ``at_least``. Returns the units taken. Refused at once
        when the custodian answers a top-up request with nothing left in the deployment's balance.
        """
        minimum = units if at_least is None else at_least
        if not 1 <= minimum <= units:
            raise ValueError(f"cannot reserve {units} units, at least {minimum}")
        deadline: float | None = None
        answers = self._topup_answers
        asked = False
        while True:
            self._check_open()
            free = self.limit - self.committed - self.reserved
            if free >= units:
                return self._take(units)
            if deadline is None:
                deadline = self._clock() + self._topup_wait
            if self._topup_answers > answers:
                answers, asked = self._topup_answers, False
                if self.deployment_balance == 0:
                    return self._take_at_least(free, minimum)
            if not self._could_grow() and free >= minimum:
                return self._take(free)  # the lease is as large as a top-up makes it
            if not asked and self._could_grow():
                # Asked again after each answer, as long as a top-up can bring something; when the
                # lease is full of calls in flight, a commit comes first (and wakes this caller).
                asked = True
                self.topup_wanted.set()
            remaining = deadline - self._clock()
            if remaining <= 0:
                return self._take_at_least(free, minimum)
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                self._check_open()
                free = self.limit - self.committed - self.reserved
                if free >= units:
                    continue
                return self._take_at_least(free, minimum)

    def _take(self, units: int) -> int:
        self.reserved += units
        return units

    def _take_at_least(self, free: int, minimum: int) -> int:
        if free < minimum:
            raise QuotaExhaustedError("inference" if self.tokens is None else "tokens")
        return self._take(free)

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

    def refund(self, units: int = 1) -> None:
        """The call failed: its reserved units are free again."""
        self._release(units)

    def covers(self) -> bool:
        """Whether the lease still backs every reservation: open, not suspended, not cut below them."""
        return (
            not self.closed
            and not self.suspended
            and not self.offline
            and self.committed + self.reserved <= self.limit
        )

    def settle(self, reserved: int, tokens: TokenCounts) -> None:
        """A generation ends: the tokens it produced count, the rest of its ``reserved`` is free again.

        The tokens were sent while ``covers`` held, so they count even when the custodian cut
        the lease since: every token an end user received is paid for.
        """
        if tokens.total > reserved:
            raise RuntimeError(f"lease: {tokens.total} tokens settled against {reserved} reserved")
        self._release(reserved)
        self.committed += tokens.total
        if self.tokens is not None:
            self.tokens += tokens
        if not self._topup_in_flight and self._running_low():
            self.topup_wanted.set()

    def _release(self, units: int = 1) -> None:
        if self.reserved < units:
            raise RuntimeError("lease: commit or refund without a reservation")
        self.reserved -= units
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
