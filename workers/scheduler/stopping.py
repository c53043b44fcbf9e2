"""How a request's output ends: the stop rules applied to each sampled token (vLLM order: a stop
token, then length, then a context the pool can never hold), the ERROR for a request too large for
the pool, and the ``TokenDelta`` each token or finish sends to the client.
"""

from __future__ import annotations

import struct
import time

from proto import FinishReason, RequestPhases, TokenDelta, TokenLogprobs
from workers.scheduler.request import Request

# A TokenDelta's token_ids: one little-endian int32.
pack_token_id = struct.Struct("<i").pack


def finish_reason(
    request: Request, token_id: int, max_pool_tokens: int, num_tokens: int | None = None
) -> FinishReason | None:
    """Why ``request`` stops after appending the freshly sampled ``token_id`` (None: it goes on).
    Stop tokens count only once ``min_tokens`` outputs came before them. ERROR: its next step needs
    K/V for all its tokens at once, which the pool cannot hold even with every other request
    preempted; failing it beats waiting forever. ``num_tokens``: the request's tokens up to and
    including ``token_id`` (default: all of them; less when a later step's placeholder follows it)."""
    if num_tokens is None:
        num_tokens = len(request.token_ids)
    if (
        token_id in request.stop_token_ids
        and num_tokens - request.num_prompt_tokens > request.params.min_tokens
    ):
        return FinishReason.STOP
    if num_tokens >= request.max_num_tokens:
        return FinishReason.LENGTH
    if num_tokens > max_pool_tokens:
        return FinishReason.ERROR
    return None


def token_delta(
    request: Request,
    packed_token_ids: bytes,
    logprobs: TokenLogprobs | None = None,
    reason: FinishReason | None = None,
    stop_token_id: int = -1,
    error: str = "",
) -> TokenDelta:
    """The delta sending ``packed_token_ids`` (and, with a ``reason``, the request's end)."""
    return TokenDelta(
        request_id=request.request_id,
        token_ids=packed_token_ids,
        finish_reason=reason,
        stop_token_id=stop_token_id,
        num_prompt_tokens=request.num_prompt_tokens,
        logprobs=[logprobs] if logprobs is not None else [],
        num_cached_tokens=request.num_cached_tokens,
        trace_context=request.trace_context,
        error=error,
        prompt_logprobs=request.take_prompt_logprobs() if request.pending_prompt_logprobs else [],
    )


def final_delta(
    request: Request,
    reason: FinishReason,
    packed_token_ids: bytes = b"",
    stop_token_id: int = -1,
    logprobs: TokenLogprobs | None = None,
    error: str = "",
) -> TokenDelta:
    """A request's last delta; records how it ended on the request, with its phase timings once it
    has a first token."""
    request.finish_reason = reason
    request.stop_token_id = stop_token_id
    request.error = error
    delta = token_delta(request, packed_token_ids, logprobs, reason, stop_token_id, error)
    if request.first_token_time:
        delta.phases = RequestPhases(
            queue_seconds=request.scheduled_time - request.queued_time,
            prefill_seconds=request.first_token_time - request.scheduled_time,
            decode_seconds=time.monotonic() - request.first_token_time,
        )
    return delta


def pool_too_small(num_tokens: int, block_size: int, max_pool_tokens: int, pooling: bool) -> str:
    """The error for a request of ``num_tokens`` tokens that the pool can never hold at once."""
    num_blocks = -(-num_tokens // block_size)
    num_pool_blocks = max_pool_tokens // block_size
    pool = "device and host pools have" if pooling else "device pool has"
    return (
        f"the request needs {num_blocks} KV blocks for its {num_tokens} tokens but the {pool} "
        f"only {num_pool_blocks} blocks of {block_size} tokens; "
        "raise --device-kv-blocks/--device-kv-gib or lower max_tokens."
    )
