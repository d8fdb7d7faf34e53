"""Rates, audit samples and stream slots: the bounds on what one caller may make the custodian do."""

from __future__ import annotations

import pytest

from custodian.errors import BusyError
from custodian.throttle import AuditSampler, Rate, StreamSlots


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_rate_allows_a_burst_then_refills_per_key() -> None:
    clock = _Clock()
    rate = Rate(burst=2, per_second=0.5, clock=clock)
    assert [rate.take("a"), rate.take("a"), rate.take("a"), rate.take("a")] == [0, 0, None, None]
    assert rate.take("b") == 0  # keys are independent
    clock.now += 2  # one token back
    assert rate.take("a") == 2  # and it says how many were refused meanwhile
    assert rate.take("a") is None
    clock.now += 3600  # never more than the burst
    assert [rate.take("a"), rate.take("a"), rate.take("a")] == [1, 0, None]


def test_a_rate_table_stays_bounded_whatever_keys_callers_invent() -> None:
    rate = Rate(burst=1, per_second=1e-9, max_keys=10, clock=_Clock())
    for n in range(10_000):
        rate.take(f"key-{n}")
    assert len(rate) == 10


@pytest.mark.parametrize(
    ("burst", "per_second", "max_keys"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)], ids=["burst", "rate", "keys"]
)
def test_a_rate_refuses_a_meaningless_configuration(burst: int, per_second: float, max_keys: int) -> None:
    with pytest.raises(ValueError, match="rate"):
        Rate(burst=burst, per_second=per_second, max_keys=max_keys)


def test_the_sampler_counts_what_it_leaves_out() -> None:
    dropped: list[int] = []
    sampler = AuditSampler(Rate(burst=1, per_second=1e-9, clock=_Clock()), lambda: dropped.append(1))
    assert [sampler.sample("x") for _ in range(4)] == [0, None, None, None]
    assert len(dropped) == 3


def test_stream_slots_refuse_one_more_and_free_on_exit() -> None:
    slots = StreamSlots("Watch", 2)
    with slots.hold("i"), slots.hold("i"):
        with pytest.raises(BusyError, match="2 Watch streams"), slots.hold("i"):
            pass
        with slots.hold("other"):
            assert slots.held("other") == 1
    assert slots.held("i") == 0
    with pytest.raises(RuntimeError), slots.hold("i"):
        raise RuntimeError("the stream failed")
    assert slots.held("i") == 0
