"""Pieces both endpoints build their answers from: ids, usage, logprobs, and the run loop that turns
a :class:`Generation` into a full response or an SSE stream."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from pied.api import sse
from pied.api.errors import APIError
from pied.api.generation import Choice, Generation
from pied.api.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)
from pied.api.state import ServerState
from pied.engine_client import EngineDeadError
from pied.output_processor import ChoiceUpdate

logger = logging.getLogger(__name__)

# JSON has no -inf; vLLM reports impossible tokens with this floor instead.
MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_seconds() -> int:
    return int(time.time())


def usage(generation: Generation) -> UsageInfo:
    prompt_tokens = generation.num_prompt_tokens
    completion_tokens = generation.num_completion_tokens
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=generation.num_cached_tokens),
    )


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def top_entries(entry: dict[int, float], num_top: int) -> list[tuple[int, float]]:
    # The entry holds the sampled token first, then the top alternatives without it: sorting and
    # keeping num_top gives the true top-k whether or not the sampled token was among them.
    return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:num_top]


def chat_logprobs(
    server: ServerState, token_ids: list[int], entries: list[dict[int, float]], num_top: int
) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        token = server.token_text(token_id)
        tops = [
            TopLogprob(text, clamp(logprob), list(text.encode()))
            for text, logprob in ((server.token_text(i), lp) for i, lp in top_entries(entry, num_top))
        ]
        content.append(ChatTokenLogprob(token, clamp(entry[token_id]), list(token.encode()), tops))
    return ChatLogprobs(content)


def completion_logprobs(
    server: ServerState, token_ids: list[int], entries: list[dict[int, float]], num_top: int, text_offset: int
) -> CompletionLogprobs:
    """``text_offset`` is where the first token's text starts in the choice's text."""
    logprobs = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        token = server.token_text(token_id)
        logprobs.tokens.append(token)
        logprobs.token_logprobs.append(clamp(entry[token_id]))
        # vLLM's completions format: the sampled token plus the top alternatives, by token text.
        top = {server.token_text(i): clamp(lp) for i, lp in top_entries(entry, num_top)}
        top.setdefault(token, clamp(entry[token_id]))
        logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(text_offset)
        text_offset += len(token)
    return logprobs


def error_for_update(generation: Generation, update: ChoiceUpdate) -> APIError | None:
    if update.finish_reason == "error":
        # The engine's own text goes to the log: it may name internals the client has no use for.
        logger.error("the engine failed %s: %s", generation.request_id, update.error or "unknown error")
        return APIError(500, "The engine failed the request; the server's log has the details.")
    return None


async def run_to_completion(generation: Generation) -> None:
    """Consume every update; raise APIError if the engine failed a choice or died."""
    try:
        async for _choice, update in generation.updates():
            error = error_for_update(generation, update)
            if error is not None:
                raise error
    except EngineDeadError as error:
        raise APIError(503, f"The engine is not available: {error}") from error


ChunkBuilder = Callable[[Choice, ChoiceUpdate], msgspec.Struct | None]


async def run_stream(
    request: web.Request,
    generation: Generation,
    *,
    first_chunks: list[msgspec.Struct],
    chunk_for: ChunkBuilder,
    usage_chunk: Callable[[], msgspec.Struct] | None,
) -> web.StreamResponse:
    """Stream a generation as SSE: ``first_chunks``, one chunk per update (``chunk_for`` may skip
    an update by returning None), the usage chunk when asked, then ``[DONE]``.

    A client that disconnects, or reads nothing for the write deadline, makes a write fail (or
    cancels this handler); the caller's ``generation.close()`` then aborts the engine requests.
    """
    response = await sse.open_event_stream(request)
    timeout = generation.server.write_timeout

    async def send(data: bytes) -> None:
        await sse.write(request, response, data, timeout)

    async def send_error(error: APIError) -> None:
        await sse.send_error(request, response, error, timeout)

    try:
        if first_chunks:
            await send(b"".join(sse.event(chunk) for chunk in first_chunks))
        try:
            async for choice, update in generation.updates():
                error = error_for_update(generation, update)
                if error is not None:
                    await send_error(error)
                    return response
                chunk = chunk_for(choice, update)
                if chunk is not None:
                    await send(sse.event(chunk))
        except EngineDeadError as error:
            await send_error(APIError(503, f"The engine is not available: {error}"))
            return response
        except ConnectionResetError:
            raise
        except Exception:  # noqa: BLE001 - the status is sent; the client must still hear of it
            logger.exception("error while streaming %s", generation.request_id)
            await send_error(APIError(500, "Internal server error; the server's log has the details."))
            return response
        tail = sse.event(usage_chunk()) if usage_chunk is not None else b""
        await send(tail + sse.DONE)
    except ConnectionResetError:
        pass  # the client went away or stopped reading; close() aborts what is left
    return response


def add_usage(chunk: Any, generation: Generation, include_usage: bool, continuous: bool) -> Any:
    """OpenAI's rule: with include_usage every chunk has ``usage`` (null but on the last one);
    vLLM's continuous_usage_stats puts the running totals on every chunk instead."""
    if include_usage:
        chunk.usage = usage(generation) if continuous else None
    return chunk
