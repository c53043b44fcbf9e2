"""Stop strings found in linear time: one Aho-Corasick automaton over all of a request's stop strings.

The automaton's state after reading the output so far is the longest end of the text that is a
prefix of some stop string. That one number answers both questions the detokenizer asks per
character: has a stop string just been completed (the state, or a state on its failure chain, is a
whole stop string), and how much of the text's end must be held back because a later token could
complete a stop string (the state's depth). Each character costs one transition plus failure-link
steps that never outnumber the characters read, so matching is linear in the output whatever the
stop strings are (the naive per-token prefix check was quadratic in a stop string's length).

The automaton is immutable and shared by every choice of a request (``for_stops`` caches it); each
choice keeps only its own state number.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence


class StopAutomaton:
    """The Aho-Corasick automaton of ``stops`` (non-empty strings). States are ints, 0 is the root."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._children: list[dict[str, int]] = [{}]
        self.depth: list[int] = [0]
        self._fail: list[int] = [0]
        # The longest stop string that ends at this state (its own string or a suffix of it).
        self.matched: list[str | None] = [None]
        self.steps = 0  # transitions and failure-link steps taken by advance(): a cost counter for tests
        for stop in self.stops:
            if not stop:
                raise ValueError("stop strings must not be empty")
            state = 0
            for char in stop:
                child = self._children[state].get(char)
                if child is None:
                    child = len(self._children)
                    self._children[state][char] = child
                    self._children.append({})
                    self.depth.append(self.depth[state] + 1)
                    self._fail.append(0)
                    self.matched.append(None)
                state = child
            self.matched[state] = stop
        self._link()

    def _link(self) -> None:
        """Failure links breadth first: a state's link is the longest proper suffix of its string
        that is also a state; a state inherits its link's match when it has none of its own."""
        queue = deque(self._children[0].values())
        while queue:
            state = queue.popleft()
            for char, child in self._children[state].items():
                link = self._fail[state]
                while link and char not in self._children[link]:
                    link = self._fail[link]
                target = self._children[link].get(char, 0)
                self._fail[child] = target if target != child else 0
                if self.matched[child] is None:
                    self.matched[child] = self.matched[self._fail[child]]
                queue.append(child)

    def advance(self, state: int, char: str) -> int:
        """The state after reading ``char`` in ``state``."""
        children = self._children
        while True:
            self.steps += 1
            child = children[state].get(char)
            if child is not None:
                return child
            if state == 0:
                return 0
            state = self._fail[state]


@functools.lru_cache(maxsize=256)
def for_stops(stops: tuple[str, ...]) -> StopAutomaton:
    """The automaton of ``stops``, built once for every choice (and every request) that uses them."""
    return StopAutomaton(stops)
