"""Reading a request body: within the body deadline, and decoded off the event loop when large.

A client that sends its headers and then trickles (or never sends) the body would otherwise hold
its admission place and its connection for as long as it likes: past ``body_timeout`` it gets a
408 and the connection is closed. A body of megabytes takes msgspec tens of milliseconds to
decode; that runs on a thread so every stream this loop serves keeps flowing.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from aiohttp import web

from pied.api.errors import APIError
from pied.api.params import decode_body
from pied.api.state import ServerState

T = TypeVar("T")

THREAD_DECODE_BYTES = 1 << 20  # about a millisecond of decoding per 100 KiB below it


async def read_body(request: web.Request, server: ServerState) -> bytes:
    try:
        async with asyncio.timeout(server.body_timeout):
            return await request.read()
    except TimeoutError:
        raise APIError(
            408,
            f"The request body did not arrive within {server.body_timeout:g} seconds.",
            headers={"Connection": "close"},  # the rest of the body is not worth waiting for
        ) from None


async def read_json(request: web.Request, server: ServerState, request_type: type[T]) -> T:
    """The body decoded as ``request_type`` (a 400 naming the field when it does not fit)."""
    body = await read_body(request, server)
    if len(body) < THREAD_DECODE_BYTES:
        return decode_body(body, request_type)
    return await asyncio.to_thread(decode_body, body, request_type)
