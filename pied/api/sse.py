"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` events, then ``data: [DONE]``.

An error after the stream started cannot change the status line any more, so it is sent as an
event ``data: {"error": {...}}`` followed by ``data: [DONE]`` (what vLLM does).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from pied.api.errors import APIError

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


async def send_error(response: web.StreamResponse, error: APIError) -> None:
    await response.write(event(error.body()) + DONE)
