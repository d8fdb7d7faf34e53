"""While the custodian is away: one warning, then a reminder at most every so often, one line on return."""

from __future__ import annotations

import logging

import pytest

from enclave._daemon.outage import Outage


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_a_second_for_a_minute_logs_three_warnings_and_one_return(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 13 item 19: the enclave logged a line a second while the custodian was down."""
    clock = Clock()
    outage = Outage(logging.getLogger("test.outage"), "custodian unreachable", every=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for second in range(61):
            clock.now = float(second)
            outage.failed("UNAVAILABLE")
        outage.over("reconnected")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "custodian unreachable (UNAVAILABLE); retrying",
        "custodian unreachable for 30 s (31 tries failed; last: UNAVAILABLE); still retrying",
        "custodian unreachable for 60 s (61 tries failed; last: UNAVAILABLE); still retrying",
        "reconnected after 60.0 s",
    ]
    assert not outage.ongoing


def test_a_return_without_an_outage_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(logging.getLogger("test.outage"), "custodian unreachable")
    with caplog.at_level(logging.DEBUG, logger="test.outage"):
        outage.over("reconnected")
    assert caplog.records == []
