"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` events, then ``data: [DONE]``.

An error after the stream started cannot change the status line any more, so it is sent as an
event ``data: {"error": {...}}`` followed by ``data: [DONE]`` (what vLLM does).

Every write has a deadline: a client that stops reading fills the socket buffers, and the write
then waits for it forever, holding the connection, the engine requests and the drain on SIGTERM.
Past ``timeout`` the connection is aborted and the write raises ConnectionResetError, as if the
client had gone away.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from aiohttp import web

from pied.api.errors import APIError

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response


def event(payload: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def send_error(
    request: web.Request, response: web.StreamResponse, error: APIError, timeout: float
) -> None:
    await write(request, response, event(error.body()) + DONE, timeout)


async def write(request: web.Request, response: web.StreamResponse, data: bytes, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await response.write(data)
    except TimeoutError:
        logger.info("cutting a stream to %s: it read nothing for %g s", request.remote, timeout)
        transport = request.transport
        if transport is not None:
            # abort, not close: close() would wait for the unread buffer to drain, which is never.
            transport.abort()
        raise ConnectionResetError(f"the client read nothing for {timeout:g} seconds") from None
