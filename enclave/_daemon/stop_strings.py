"""Stop strings: text is sent only once no stop string can begin in it.

Generated text arrives in pieces, and a stop string may straddle two of them,
so the scanner holds back the end of the text that could still begin a stop
string, and ends the text before the stop string completed first (which is
never sent): generation would have stopped there, whatever came after.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that can be sent now; ``stopped`` turns true at the first stop string."""
        if self.stopped:
            return ""
        self._held += text
        cut = first_stop(self._held, self._stops)
        if cut is not None:
            self.stopped = True
            sendable, self._held = self._held[:cut], ""
            return sendable
        keep = self._longest_open_prefix()
        cut = len(self._held) - keep
        sendable, self._held = self._held[:cut], self._held[cut:]
        return sendable

    def flush(self) -> str:
        """What was held back, once generation has ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_open_prefix(self) -> int:
        """Length of the longest end of the held text that is the beginning of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the text ends: before the stop string completed first (of two, the longer one)."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return min(found)[1] if found else None
