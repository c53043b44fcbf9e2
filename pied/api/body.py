"""Reading a request body: within the body deadline, and measured before it is decoded.

A client that sends its headers and then trickles (or never sends) the body would otherwise hold
its admission place and its connection for as long as it likes: past ``body_timeout`` it gets a
408 and the connection is closed.

Decoding holds the GIL (msgspec builds Python objects; about 25 ms per MiB of small integers on
this project's test machines), so a worker thread would not free the event loop: the body limit
bounds that pause instead. Integer lists with a limit (``stop_token_ids``) are measured on the raw
bytes first (milliseconds for 32 MiB, in C): a body of millions of ids is refused before it is
decoded.
"""

from __future__ import annotations

import asyncio
import re
from typing import TypeVar

from aiohttp import web

from pied.api.errors import APIError, bad_request
from pied.api.params import decode_body
from pied.api.state import ServerState

T = TypeVar("T")

PRESCAN_BYTES = 64 << 10  # below it the decoder is quicker than any scan
PRESCAN_CHUNK_BYTES = 16 << 10
_ARRAY_START = re.compile(rb"\s*:\s*\[")


def array_longer_than(body: bytes, key: str, limit: int) -> bool:
    """Whether the flat array under ``"key"`` in a JSON body has more than ``limit`` items, read
    off its bytes without copying them; False when there is no such array or it holds strings or
    containers (the decoder then decides).

    A quoted key cannot occur inside a JSON string (its quotes would be escaped), so the match is
    the key of an object; with no string or container inside, the items are the commas plus one.
    Commas are counted a chunk at a time, up to the limit: the cost does not grow with the array."""
    position = body.find(b'"' + key.encode() + b'"')
    if position < 0:
        return False
    start = _ARRAY_START.match(body, position + len(key) + 2)
    if start is None:
        return False
    first, end = start.end(), body.find(b"]", start.end())
    if end < 0 or any(body.find(char, first, end) >= 0 for char in (b'"', b"[", b"{")):
        return False
    num_commas = 0
    for chunk_start in range(first, end, PRESCAN_CHUNK_BYTES):
        num_commas += body.count(b",", chunk_start, min(end, chunk_start + PRESCAN_CHUNK_BYTES))
        if num_commas >= limit:
            return True
    return False


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
    if len(body) >= PRESCAN_BYTES:
        limit = server.limits.max_stop_token_ids
        if array_longer_than(body, "stop_token_ids", limit):
            raise bad_request(f"stop_token_ids may have at most {limit} ids.", "stop_token_ids")
    return decode_body(body, request_type)
