"""Bounds on what one caller may make the custodian do: rates, samples and concurrent streams.

``Rate`` is a token bucket per key (an instance id, a caller's address): a burst,
then a steady refill. Its table of keys is bounded, so callers that invent keys
cannot grow it; when full it forgets the key idle longest, which at worst hands
that key a fresh burst. ``AuditSampler`` uses one to decide which refusals reach
the append-only audit log; the rest are only counted, and the next sample says
how many it stands for. ``StreamSlots`` caps the streams one instance holds open.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from custodian.errors import BusyError

# Keys a table remembers; beyond this the one idle longest is forgotten.
MAX_KEYS = 4096


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    # Calls refused since the key last got a token (what a sample stands for).
    refused: int = 0


class Rate:
    """``burst`` calls at once per key, then one every ``1 / per_second`` seconds."""

    def __init__(
        self,
        *,
        burst: int,
        per_second: float,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or per_second <= 0 or max_keys < 1:
            raise ValueError("a rate needs a burst of at least 1, a positive refill and room for a key")
        self._burst = burst
        self._per_second = per_second
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str) -> int | None:
        """Spend one of ``key``'s tokens: the calls refused since its last one, or None if none is left."""
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(tokens=float(self._burst), stamp=now)
            if len(self._buckets) >= self._max_keys:
                self._buckets.popitem(last=False)
        bucket.tokens = min(float(self._burst), bucket.tokens + (now - bucket.stamp) * self._per_second)
        bucket.stamp = now
        self._buckets[key] = bucket
        if bucket.tokens < 1:
            bucket.refused += 1
            return None
        bucket.tokens -= 1
        refused, bucket.refused = bucket.refused, 0
        return refused

    def __len__(self) -> int:
        return len(self._buckets)


class AuditSampler:
    """Which refusals of one kind are written to the audit log: a rate-limited sample per key."""

    def __init__(self, rate: Rate, on_dropped: Callable[[], None]) -> None:
        self._rate = rate
        self._on_dropped = on_dropped

    def sample(self, key: str) -> int | None:
        """None: count the refusal only. Else write it, noting this many refusals left out before it."""
        left_out = self._rate.take(key)
        if left_out is None:
            self._on_dropped()
        return left_out


class StreamSlots:
    """At most ``limit`` streams of one kind open per instance; one more is refused as busy."""

    def __init__(self, what: str, limit: int) -> None:
        self._what = what
        self._limit = limit
        self._open: dict[str, int] = {}

    @contextmanager
    def hold(self, instance_id: str) -> Iterator[None]:
        held = self._open.get(instance_id, 0)
        if held >= self._limit:
            raise BusyError(
                f"instance {instance_id} already holds {held} {self._what} streams; close one first"
            )
        self._open[instance_id] = held + 1
        try:
            yield
        finally:
            remaining = self._open[instance_id] - 1
            if remaining:
                self._open[instance_id] = remaining
            else:
                del self._open[instance_id]

    def held(self, instance_id: str) -> int:
        return self._open.get(instance_id, 0)
