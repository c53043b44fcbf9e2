"""Incremental detokenisation with stop strings: token ids in, exact text deltas out.

Text comes from vLLM's prefix/read-offset technique: decode a short window of recent tokens twice
(without and with the new ones) and emit the difference, so each step costs two small decodes
whatever the output length. A window whose text ends in U+FFFD is an incomplete UTF-8 sequence (a
character split across byte-level tokens): nothing is emitted until a later token completes it.

Stop strings: the text is read as it grows by one automaton over all stop strings
(:mod:`pied.stop_matcher`, linear in the text whatever the stop strings); the first stop string to
be complete ends the output, cut before it (or after it with ``include_stop_str_in_output``). Text
that could still become the start of a stop string is held back, so the deltas never include text a
later stop string would cut, and the concatenated deltas always equal the final text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import proto
from pied.stop_matcher import for_stops

# As vLLM: decoding starts with this many prompt tokens as context, so the first output token
# decodes as it does after the prompt (SentencePiece drops a word's leading space at the start).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """One request's output text. Call :meth:`push` with each step's new token ids and
    :meth:`finish` once when the request ends without a stop string; :attr:`text` is everything
    returned so far, so after :meth:`finish` (or a stop) it is the final text."""

    def __init__(
        self, tokenizer: Decoder, prompt_token_ids: Sequence[int], params: proto.SamplingParams
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop_strings = list(params.stop)
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.stopped = False
        self.stop_reason: str | None = None
        self.num_output_tokens = 0
        self._finished = False

        context = [int(t) for t in list(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]]
        if context and self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends inside a character: the output's first bytes would complete it.
            context = []
        # _ids holds the context, then every output id; the window decoded is _ids[_prefix_offset:].
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)

        # The text is kept in pieces so a long output costs no quadratic copying: what the caller
        # has (_emitted_parts) and what is decoded but held back (_pending: the end of the text that
        # a later token could turn into a stop string, as long as the automaton state's depth).
        self._emitted_parts: list[str] = []
        self._pending = ""
        stops = tuple(dict.fromkeys(stop for stop in self.stop_strings if stop))
        self._stops = for_stops(stops) if stops else None
        self._stop_state = 0

    @property
    def text(self) -> str:
        """The output text returned so far (the concatenation of every delta)."""
        if len(self._emitted_parts) > 1:
            self._emitted_parts[:] = ["".join(self._emitted_parts)]
        return self._emitted_parts[0] if self._emitted_parts else ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: Iterable[int]) -> str:
        """Add output tokens; return the new text that is certain (possibly empty). After a stop
        string (``stopped``) further tokens are ignored."""
        if self.stopped or self._finished:
            return ""
        new_ids = [int(t) for t in token_ids]
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        self.num_output_tokens += len(new_ids)
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_REPLACEMENT):
            # Nothing new yet: special tokens skipped, or a character still incomplete.
            return ""
        new_text = window_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._advance(new_text, final=False)

    def finish(self) -> str:
        """The request ended (eos, length, abort): return everything still held back, including an
        incomplete character as U+FFFD, as a full decode would show it."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        window_text = self._decode(self._ids[self._prefix_offset :])
        return self._advance(window_text[len(self._prefix_text) :], final=True)

    def _advance(self, new_text: str, final: bool) -> str:
        if self._stops is not None and new_text:
            found = self._read_stops(new_text)
            if found is not None:
                end_in_new, stop = found
                # The match ends inside new_text; the delta starts after the emitted text.
                unseen = self._pending + new_text
                end = len(self._pending) + end_in_new
                if not self.include_stop_str_in_output:
                    end -= len(stop)
                self.stopped = True
                self.stop_reason = stop
                self._pending = ""
                return self._emit(unseen[: max(end, 0)])
        self._pending += new_text
        held = 0
        if self._stops is not None and not final and not self.include_stop_str_in_output:
            held = self._stops.depth[self._stop_state]
        held = min(held, len(self._pending))
        delta = self._pending[: len(self._pending) - held]
        self._pending = self._pending[len(delta) :]
        return self._emit(delta)

    def _read_stops(self, new_text: str) -> tuple[int, str] | None:
        """Feed ``new_text`` to the automaton. The first stop string completed in it (the one that
        ends earliest; at one end, the longest) as (its end in ``new_text``, the stop string).
        Generation would have stopped there however many tokens this push brought, so the result
        does not depend on the chunking. As vLLM, stop strings count only once min_tokens tokens
        are out; before that the text is still read, so a stop string may start in it."""
        automaton = self._stops
        assert automaton is not None
        counting = self.num_output_tokens > self.min_tokens
        state = self._stop_state
        for position, char in enumerate(new_text):
            state = automaton.advance(state, char)
            stop = automaton.matched[state]
            if stop is not None and counting:
                self._stop_state = state
                return position + 1, stop
        self._stop_state = state
        return None

    def _emit(self, delta: str) -> str:
        if delta:
            self._emitted_parts.append(delta)
        return delta
