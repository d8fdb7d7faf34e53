"""What the daemon says while the custodian is away: once when it goes, rarely while it stays away.

A custodian that is down for minutes must not fill the borrower's log with a
line a second (a failed report, a failed reconnection, each retried within
the second). The first failure is a warning; repeats are logged at most every
``every`` seconds, with how long it has been and how many tries failed; the
return is one line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Seconds between two "still unreachable" lines.
REPEAT_EVERY = 30.0


class Outage:
    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        every: float = REPEAT_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._every = every
        self._clock = clock
        self._since: float | None = None
        self._last_said = 0.0
        self._failures = 0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, reason: str) -> None:
        """One more failed try: a warning the first time, a reminder at most every ``every`` seconds."""
        now = self._clock()
        self._failures += 1
        if self._since is None:
            self._since = self._last_said = now
            self._logger.warning("%s (%s); retrying", self._what, reason)
        elif now - self._last_said >= self._every:
            self._last_said = now
            self._logger.warning(
                "%s for %.0f s (%d tries failed; last: %s); still retrying",
                self._what,
                now - self._since,
                self._failures,
                reason,
            )
        else:
            self._logger.debug("%s (%s)", self._what, reason)

    def over(self, message: str) -> None:
        """The custodian answered again: one line, if there was an outage to speak of."""
        if self._since is not None:
            self._logger.info("%s after %.1f s", message, self._clock() - self._since)
        self._since = None
        self._failures = 0
