"""The stop-string automaton: the same answers as a naive search, in work linear in the text.

Work is counted (``StopAutomaton.steps``: transitions plus failure-link steps), never timed.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import proto
from pied.detokenizer import IncrementalDetokenizer
from pied.stop_matcher import StopAutomaton, for_stops


def naive_first_stop(stops: list[str], text: str) -> tuple[int, str] | None:
    """(end, stop) of the stop string completed first reading ``text``; at one end, the longest."""
    for end in range(1, len(text) + 1):
        found = [stop for stop in stops if text[:end].endswith(stop)]
        if found:
            return end, max(found, key=len)
    return None


def naive_held(stops: list[str], text: str) -> int:
    """The longest end of ``text`` that is a prefix of a stop string."""
    return max(
        (k for k in range(len(text) + 1) if any(s.startswith(text[len(text) - k :]) for s in stops)),
        default=0,
    )


def read(automaton: StopAutomaton, text: str) -> tuple[tuple[int, str] | None, int]:
    state = 0
    for position, char in enumerate(text):
        state = automaton.advance(state, char)
        stop = automaton.matched[state]
        if stop is not None:
            return (position + 1, stop), state
    return None, state


@settings(max_examples=400, deadline=None)
@given(
    stops=st.lists(st.text("abc", min_size=1, max_size=6), min_size=1, max_size=5),
    text=st.text("abc", max_size=30),
)
def test_automaton_agrees_with_a_naive_search(stops: list[str], text: str) -> None:
    automaton = StopAutomaton(stops)
    found, state = read(automaton, text)
    assert found == naive_first_stop(stops, text)
    if found is None:
        assert automaton.depth[state] == naive_held(stops, text)


def test_work_is_linear_in_the_text_whatever_the_stop_strings() -> None:
    # The quadratic case of a per-token prefix check: a long run of one character against stop
    # strings that are that run plus a character that never comes.
    stops = ["a" * 1000 + "b", "a" * 500 + "c", "ab" * 250 + "d"]
    automaton = StopAutomaton(stops)
    text = ("a" * 999 + "x") * 20 + "ab" * 5000
    found, _ = read(automaton, text)
    assert found is None
    assert automaton.steps <= 2 * len(text)  # one transition per character + failure steps <= characters


class CharDecoder:
    """Token id i is character chr(i): the detokenizer's text is the ids as a string."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def test_detokenizer_reads_each_character_once_per_push() -> None:
    stops = ("a" * 1023 + "b",)
    automaton = for_stops(stops)  # the instance the detokenizer shares
    detokenizer = IncrementalDetokenizer(CharDecoder(), [], proto.SamplingParams(stop=list(stops)))
    before = automaton.steps
    num_tokens = 5000
    for _ in range(num_tokens):
        detokenizer.push([ord("a")])
    # Each push decodes a few characters; the matching costs at most 2 steps per new character.
    assert automaton.steps - before <= 2 * num_tokens
    # The last 1023 characters could start the stop string: held back, then cut with it.
    assert detokenizer.text == "a" * (num_tokens - 1023)
    assert detokenizer.push([ord("b")]) == "" and detokenizer.stop_reason == stops[0]
    assert detokenizer.text == "a" * (num_tokens - 1023)


def test_shared_automaton_is_built_once_per_stop_list() -> None:
    assert for_stops(("x", "yz")) is for_stops(("x", "yz"))
