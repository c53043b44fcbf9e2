"""Turns the engine's token deltas into text: incremental detokenisation, stop strings, logprobs.

One :class:`ChoiceState` per engine request (a request with ``n`` choices is ``n`` engine requests).
Shared by ``pied.LLM`` and the HTTP API so both produce the same text for the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import proto
from pied.detokenizer import IncrementalDetokenizer
from pied.tokenizer import Tokenizer


@dataclass
class ChoiceUpdate:
    """What one delta changed for one choice."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # True when the frontend itself ended the request (a stop string): the engine must abort it.
    abort_engine: bool = False
    error: str = ""


def logprobs_dicts(entries: list[proto.TokenLogprobs], token_ids: list[int]) -> list[dict[int, float]]:
    """vLLM-style logprobs: per token, {token_id: logprob}, the sampled token first."""
    result = []
    for token_id, entry in zip(token_ids, entries):
        top = dict(zip(proto.unpack_i32(entry.top_ids).tolist(), proto.unpack_f32(entry.top_logprobs).tolist()))
        result.append({token_id: entry.logprob, **{k: v for k, v in top.items() if k != token_id}})
    return result


# One prompt position's logprobs: token id -> (logprob, rank), the prompt token first; None for the
# first position, which has nothing before it (vLLM's shape).
PromptPositionLogprobs = dict[int, tuple[float, int]]


def prompt_logprobs_dicts(run: proto.PromptLogprobs, prompt_token_ids: list[int]) -> list[PromptPositionLogprobs]:
    """The positions of one run: the prompt token's logprob and rank, then the top alternatives
    (ranks 1..k; one that is the prompt token itself is listed once, as the prompt token)."""
    token_logprobs = proto.unpack_f32(run.token_logprobs).tolist()
    ranks = proto.unpack_i32(run.ranks).tolist()
    k = run.num_top
    top_ids = proto.unpack_i32(run.top_ids).reshape(-1, k).tolist() if k else [[]] * len(ranks)
    top_logprobs = proto.unpack_f32(run.top_logprobs).reshape(-1, k).tolist() if k else [[]] * len(ranks)
    positions = []
    for j, (logprob, rank) in enumerate(zip(token_logprobs, ranks)):
        entry = {prompt_token_ids[run.first_position + j]: (logprob, rank)}
        for r, (token_id, top_logprob) in enumerate(zip(top_ids[j], top_logprobs[j])):
            entry.setdefault(token_id, (top_logprob, r + 1))
        positions.append(entry)
    return positions


@dataclass
class ChoiceState:
    """The frontend's state for one engine request."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: proto.SamplingParams
    tokenizer: Tokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    sampled_ranks: list[int] = field(default_factory=list)  # each logprobs entry's sampled token's
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # With prompt_logprobs: one entry per prompt token (None for the first), filled as runs arrive.
    prompt_logprobs: list[PromptPositionLogprobs | None] | None = None

    def __post_init__(self) -> None:
        self.detokenizer = IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids, self.params)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    def add_prompt_logprobs(self, runs: list[proto.PromptLogprobs]) -> None:
        """Append the engine's runs of prompt logprobs (in order, without gaps)."""
        if self.prompt_logprobs is None:
            return
        for run in runs:
            if run.first_position != len(self.prompt_logprobs):
                raise ValueError(
                    f"prompt logprobs of {self.request_id} jump to position {run.first_position}, "
                    f"expected {len(self.prompt_logprobs)}."
                )
            self.prompt_logprobs.extend(prompt_logprobs_dicts(run, self.prompt_token_ids))

    @property
    def text(self) -> str:
        return self.detokenizer.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _stop_reason(self, stop_token_id: int) -> int | None:
        """The stop token id that ended the choice, as vLLM reports it: the tokenizer's EOS ended
        it by itself (None), any other (a stop_token_ids entry, or another EOS id of the model's
        generation config) is named, and so is the EOS where the request listed it."""
        if stop_token_id < 0:
            return None
        if stop_token_id == self.tokenizer.eos_token_id and stop_token_id not in self.params.stop_token_ids:
            return None
        return stop_token_id

    def update(self, delta: proto.TokenDelta) -> ChoiceUpdate:
        """Apply one delta. After a stop string the rest of the delta is dropped."""
        if self.finished:
            return ChoiceUpdate("", [])
        new_ids = proto.unpack_i32(delta.token_ids).tolist()
        if delta.prompt_logprobs:
            self.add_prompt_logprobs(delta.prompt_logprobs)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        # The eos / stop token that ended the request is kept in token_ids but not in the text.
        text_ids = new_ids
        if delta.finish_reason == proto.FinishReason.STOP and delta.stop_token_id >= 0 and new_ids:
            text_ids = new_ids[:-1]
        text = self.detokenizer.push(text_ids) if text_ids else ""
        update = ChoiceUpdate(text, new_ids)
        if self.detokenizer.stopped:
            # A stop string. Deltas carry one token per step while decoding, so the tokens kept are
            # those up to the one that completed it.
            update.finish_reason = "stop"
            update.stop_reason = self.detokenizer.stop_reason
            update.abort_engine = delta.finish_reason is None
        elif delta.finish_reason is not None:
            update.text += self.detokenizer.finish()
            update.finish_reason = str(delta.finish_reason)
            update.stop_reason = self._stop_reason(delta.stop_token_id)
            update.error = delta.error
        if self.logprobs is not None and delta.logprobs:
            entries = delta.logprobs[: len(update.token_ids)]
            update.logprobs = logprobs_dicts(entries, update.token_ids)
            self.logprobs.extend(update.logprobs)
            self.sampled_ranks.extend(e.rank for e in entries)
            self.cumulative_logprob += sum(e.logprob for e in entries)
        self.token_ids.extend(update.token_ids)
        if update.finish_reason is not None:
            self.finish_reason = update.finish_reason
            self.stop_reason = update.stop_reason
        return update
