"""Stop strings over text that arrives in pieces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from enclave._daemon.stop_strings import StopScanner


def scan(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    sent = "".join(scanner.push(piece) for piece in pieces)
    return sent + scanner.flush(), scanner.stopped


def test_a_stop_string_split_across_pieces_is_found_and_not_sent() -> None:
    scanner = StopScanner(["END"])
    assert scanner.push("abc E") == "abc "
    assert scanner.push("N") == ""
    assert scanner.push("D more") == ""
    assert scanner.stopped
    assert scanner.flush() == ""


def test_text_that_only_looked_like_a_stop_string_is_sent_at_the_end() -> None:
    assert scan(["abc E", "N"], ["END"]) == ("abc EN", False)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="abE\nND", max_size=30),
    st.lists(st.integers(1, 5), max_size=30),
    st.lists(st.text(alphabet="abEND", min_size=1, max_size=4), max_size=3),
)
def test_the_pieces_never_change_what_is_sent(text: str, cuts: list[int], stops: list[str]) -> None:
    pieces, rest = [], text
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    # Generation stops once a stop string is complete: the first to complete, as the text grows.
    ends = [end for end in range(len(text) + 1) if any(s in text[:end] for s in stops)]
    if not ends:
        assert scan(pieces, stops) == (text, False)
        return
    grown = text[: ends[0]]
    cut = min(len(grown) - len(s) for s in stops if grown.endswith(s))  # of two, the longer
    assert scan(pieces, stops) == (text[:cut], True)
