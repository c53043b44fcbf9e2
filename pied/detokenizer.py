"""Incremental detokenisation with stop strings: token ids in, exact text deltas out.

Text comes from vLLM's prefix/read-offset technique: decode a short window of recent tokens twice
(without and with the new ones) and emit the difference, so each step costs two small decodes
whatever the output length. A window whose text ends in U+FFFD is an incomplete UTF-8 sequence (a
character split across byte-level tokens): nothing is emitted until a later token completes it.

Stop strings: the text is searched as it grows; the first stop string to be complete ends the
output, cut before it (or after it with ``include_stop_str_in_output``). Text that could still become the start of a
stop string is held back, so the deltas never include text a later stop string would cut, and the
concatenated deltas always equal the final text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import proto

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
        # has (_emitted_parts), what is decoded but held back (_pending, shorter than the longest
        # stop string), and the end of it all (_recent) that a new stop string could start in.
        self._emitted_parts: list[str] = []
        self._pending = ""
        self._recent = ""
        self._recent_length = max((len(stop) for stop in self.stop_strings), default=1) - 1

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
        # As vLLM, stop strings count only once min_tokens tokens are out.
        if new_text and self.stop_strings and self.num_output_tokens > self.min_tokens:
            found = self._find_stop(self._recent + new_text, len(self._recent))
            if found is not None:
                position, stop = found
                end = position + len(stop) if self.include_stop_str_in_output else position
                # ``position`` counts from the start of _recent; the delta starts after the emitted text.
                unseen = self._pending + new_text
                end_in_unseen = end - len(self._recent) + len(self._pending)
                self.stopped = True
                self.stop_reason = stop
                self._pending = ""
                return self._emit(unseen[: max(end_in_unseen, 0)])
        self._pending += new_text
        recent = self._recent + new_text
        self._recent = recent[max(0, len(recent) - self._recent_length) :]
        held = 0 if final or self.include_stop_str_in_output else self._stop_prefix_length()
        held = min(held, len(self._pending))
        delta = self._pending[: len(self._pending) - held]
        self._pending = self._pending[len(delta) :]
        return self._emit(delta)

    def _emit(self, delta: str) -> str:
        if delta:
            self._emitted_parts.append(delta)
        return delta

    def _find_stop(self, text: str, previous_length: int) -> tuple[int, str] | None:
        """The stop string that is complete first in ``text``, reading what follows
        ``previous_length`` left to right: the occurrence that ends earliest (ties: the longer one).
        Generation would have stopped there however many tokens this push brought, so the result
        does not depend on the chunking."""
        best: tuple[int, int, str] | None = None
        for stop in self.stop_strings:
            # Occurrences ending in the old text were looked for already.
            position = text.find(stop, max(0, previous_length - len(stop) + 1))
            if position >= 0:
                candidate = (position + len(stop), position, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the text that is a proper prefix of a stop string."""
        text = self._recent
        longest = 0
        for stop in self.stop_strings:
            tail = text[len(text) - min(len(stop) - 1, len(text)) :]
            start = tail.find(stop[0]) if tail else -1
            while start != -1 and len(tail) - start > longest:
                if stop.startswith(tail[start:]):
                    longest = len(tail) - start
                    break
                start = tail.find(stop[0], start + 1)
        return longest
