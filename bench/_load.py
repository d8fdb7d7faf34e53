"""Load generators for blocking calls: one at a time (latency) and N at once (throughput)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


def latencies(call: Callable[[], object], calls: int) -> list[float]:
    """Seconds each of ``calls`` sequential calls took."""
    out: list[float] = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


@dataclass(frozen=True)
class Throughput:
    rate: float  # completed calls per second in the measuring window
    latencies: list[float]  # seconds, of the calls completed in the window


def throughput(call: Callable[[], object], concurrency: int, seconds: float) -> Throughput:
    """``concurrency`` threads call back to back for ``seconds``; calls completed in the window count.

    The first quarter of the time (at most 0.25 s) is ramp-up and outside the window. The rate is
    the number of completions in the window over the time between the first and the last of them.
    """
    ramp = min(0.25, seconds / 4)
    barrier = threading.Barrier(concurrency + 1)
    window: list[float] = [0.0, 0.0]
    done: list[list[tuple[float, float]]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        barrier.wait()
        begin, end = window
        mine = done[index]
        try:
            while (start := time.perf_counter()) < end:
                call()
                finished = time.perf_counter()
                if begin <= finished <= end:
                    mine.append((finished, finished - start))
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    now = time.perf_counter()
    window[0], window[1] = now + ramp, now + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    completed = sorted(value for per_thread in done for value in per_thread)
    latencies = [latency for _, latency in completed]
    if len(completed) < 2:
        return Throughput(rate=len(completed) / (seconds - ramp), latencies=latencies)
    # Completions per second between the first and the last one in the window: not quantised by
    # the window's length when calls are slow.
    span = completed[-1][0] - completed[0][0]
    return Throughput(rate=(len(completed) - 1) / span if span > 0 else math.inf, latencies=latencies)
