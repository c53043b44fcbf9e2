"""vLLM's ``prompt_logprobs`` request field: ``k`` asks, for every prompt token after the first, for
its logprob given the tokens before it, its rank, and the ``k`` most likely tokens at that position.

The engine computes them during prefill (chunked prefill included) from the raw logits and sends
them with the request's first output token (``proto.PromptLogprobs``); a request that asks reads no
prefix-cached block for its prompt, which is recomputed instead (vLLM's choice too). Only the first
choice of a prompt computes them; the others of ``n`` share them. Answers: each completion choice's
``prompt_logprobs``, chat's top-level ``prompt_logprobs``, shaped as vLLM's: a list with ``null``
for the first position, then ``{token_id: {logprob, rank, decoded_token}}``, the prompt token first.
Not with ``stream`` (vLLM refuses that too).

Text completions with ``echo`` and ``logprobs`` use them too (as vLLM does): the choice's
``logprobs`` cover the echoed prompt tokens (``null`` for the first), then the generated ones.
"""

from __future__ import annotations

from typing import Any

from pied.api.errors import bad_request
from pied.api.generation import Choice, Generation
from pied.api.protocol import CompletionLogprobs, PromptLogprob
from pied.api.state import ServerState
from pied.output_processor import PromptPositionLogprobs

MIN_LOGPROB = -9999.0  # JSON has no -inf (as pied.api.responses)


def requested_prompt_logprobs(body: Any, max_logprobs: int) -> int | None:
    """The request's ``prompt_logprobs`` checked: None, or an integer in ``[0, max_logprobs]``, not
    with ``stream``. A 400 naming the field otherwise."""
    value = getattr(body, "prompt_logprobs", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"prompt_logprobs must be an integer, got {value!r}.", "prompt_logprobs")
    if not 0 <= value <= max_logprobs:
        raise bad_request(
            f"prompt_logprobs must be in [0, {max_logprobs}] (--max-logprobs), got {value}.", "prompt_logprobs"
        )
    if body.stream:
        raise bad_request("prompt_logprobs are not available when stream is true.", "prompt_logprobs")
    return value


def top(entry: PromptPositionLogprobs, num_top: int) -> PromptPositionLogprobs:
    """The prompt token's entry and the alternatives ranked within ``num_top`` (the engine may
    have computed more, when echo's logprobs asked for more than prompt_logprobs)."""
    first = next(iter(entry))
    return {token_id: value for token_id, value in entry.items() if token_id == first or value[1] <= num_top}


def prompt_logprobs_json(
    server: ServerState, entries: list[PromptPositionLogprobs | None], num_top: int
) -> list[dict[str, PromptLogprob] | None]:
    return [
        None
        if entry is None
        else {
            str(token_id): PromptLogprob(max(logprob, MIN_LOGPROB), rank, server.token_text(token_id))
            for token_id, (logprob, rank) in top(entry, num_top).items()
        }
        for entry in entries
    ]


def prompt_entries(generation: Generation, choice: Choice) -> list[PromptPositionLogprobs | None] | None:
    """The prompt logprobs of ``choice``'s prompt (computed by its first choice), or None."""
    for other in generation.choices:
        if other.prompt_index == choice.prompt_index and other.state.prompt_logprobs is not None:
            return other.state.prompt_logprobs
    return None


def prompt_logprobs_of(
    server: ServerState, generation: Generation, choice: Choice, num_top: int
) -> list[dict[str, PromptLogprob] | None] | None:
    entries = prompt_entries(generation, choice)
    return None if entries is None else prompt_logprobs_json(server, entries, num_top)


def echo_logprobs(
    server: ServerState, prompt_token_ids: list[int], entries: list[PromptPositionLogprobs | None], num_top: int
) -> CompletionLogprobs:
    """Completions' ``logprobs`` of the echoed prompt tokens (text offsets from 0)."""
    logprobs = CompletionLogprobs()
    offset = 0
    for token_id, entry in zip(prompt_token_ids, entries):
        token = server.token_text(token_id)
        logprobs.tokens.append(token)
        logprobs.text_offset.append(offset)
        offset += len(token)
        if entry is None:  # the first token: nothing before it
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            continue
        own = max(entry[token_id][0], MIN_LOGPROB)
        logprobs.token_logprobs.append(own)
        tops = {server.token_text(t): max(lp, MIN_LOGPROB) for t, (lp, rank) in entry.items() if rank <= num_top}
        tops.setdefault(token, own)
        logprobs.top_logprobs.append(tops)
    return logprobs
