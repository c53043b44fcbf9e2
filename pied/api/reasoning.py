"""``--reasoning-parser``: the model's ``<think>...</think>`` moves into ``reasoning_content``.

Two dialects, as vLLM names them:

- ``deepseek_r1``: the chat template opens ``<think>`` in the prompt, so the output starts inside
  the reasoning (a leading ``<think>`` is dropped too); everything before ``</think>`` is
  reasoning, and without ``</think>`` all of it is.
- ``qwen3``: reasoning only when the output opens it with ``<think>`` (dropped), up to ``</think>``
  (or the end, unclosed); an output that does not start with ``<think>`` is content, a later
  ``</think>`` in it included. The rule a stream can apply at its first characters, so streamed and
  whole outputs split the same way. (vLLM's whole-output qwen3 rule also takes text before a
  ``</think>`` with no ``<think>`` as reasoning, which its stream cannot match. A chat template that
  opens ``<think>`` in the prompt, as QwQ's and Qwen3 *-Thinking-2507's do, is ``deepseek_r1``'s.)

:class:`ReasoningStream` splits a stream of text deltas the same way, holding back a partial
``<think>``/``</think>`` at the end of a delta until the next one decides it.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def split_reasoning(parser: str, text: str) -> tuple[str | None, str]:
    """``(reasoning_content, content)`` of a whole output; reasoning None when there is none."""
    opened = text.startswith(THINK_START)
    if parser == "qwen3" and not opened:
        return None, text
    body = text[len(THINK_START) :] if opened else text
    reasoning, closed, content = body.partition(THINK_END)
    return (reasoning, content) if closed else (body, "")


def _partial_marker_suffix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could begin ``marker`` (to hold back)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


@dataclass
class ReasoningStream:
    """Splits streamed text deltas into ``(reasoning, content)`` deltas."""

    parser: str
    # "start": nothing decided yet; "reasoning"; "content".
    mode: str = "start"
    pending: str = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and content text that ``delta`` (plus what was held back) completes."""
        text = self.pending + delta
        self.pending = ""
        reasoning = ""
        if self.mode == "start":
            if THINK_START.startswith(text) and text != THINK_START and not final:
                self.pending = text  # maybe the start of "<think>"
                return "", ""
            if text.startswith(THINK_START):
                text = text[len(THINK_START) :]
                self.mode = "reasoning"
            else:
                self.mode = "reasoning" if self.parser == "deepseek_r1" else "content"
        if self.mode == "reasoning":
            if THINK_END in text:
                reasoning, _, text = text.partition(THINK_END)
                self.mode = "content"
            else:
                held = 0 if final else _partial_marker_suffix(text, THINK_END)
                self.pending = text[len(text) - held :] if held else ""
                return text[: len(text) - held], ""
        return reasoning, text
