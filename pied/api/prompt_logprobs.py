"""vLLM's ``prompt_logprobs`` request field: ``k`` asks, for every prompt token after the first, for
its logprob given the tokens before it, its rank, and the ``k`` most likely tokens at that position.

The engine computes them during prefill (chunked prefill included) from the raw logits and sends
them with the request's first output token (``proto.PromptLogprobs``); a request that asks reads no
prefix-cached block for its prompt, which is recomputed instead (vLLM's choice too). Only the first
choice of a prompt computes them; the others of ``n`` share them. Answers: each completion choice's
``prompt_logprobs``, chat's top-level ``prompt_logprobs``, shaped as vLLM's: a list with ``null``
for the first position, then ``{token_id: {logprob, rank, decoded_token}}``, the prompt token first.
Not with ``stream`` (vLLM refuses that too).
"""

from __future__ import annotations

from typing import Any

from pied.api.errors import bad_request
from pied.api.generation import Choice, Generation
from pied.api.protocol import PromptLogprob
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


def prompt_logprobs_json(
    server: ServerState, entries: list[PromptPositionLogprobs | None]
) -> list[dict[str, PromptLogprob] | None]:
    return [
        None
        if entry is None
        else {
            str(token_id): PromptLogprob(max(logprob, MIN_LOGPROB), rank, server.token_text(token_id))
            for token_id, (logprob, rank) in entry.items()
        }
        for entry in entries
    ]


def prompt_logprobs_of(
    server: ServerState, generation: Generation, choice: Choice
) -> list[dict[str, PromptLogprob] | None] | None:
    """The prompt logprobs of ``choice``'s prompt (computed by its first choice), or None."""
    for other in generation.choices:
        if other.prompt_index == choice.prompt_index and other.state.prompt_logprobs is not None:
            return prompt_logprobs_json(server, other.state.prompt_logprobs)
    return None
