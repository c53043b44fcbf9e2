"""The connection cap: at most ``max_connections`` open connections, and idle ones give way.

Each connection costs a descriptor and buffers. Past the cap, a new connection first evicts the
oldest connection that has no request in progress (idle between keep-alive requests, or still
sending its headers, as a slow client does): an attacker that opens connections and sends nothing
cannot lock the others out. Only when every connection is busy answering a request is the new
one refused, with a 503 in the OpenAI error shape, and closed.

Headers themselves have a deadline too: aiohttp's idle timer (``keepalive_timeout``) runs from a
connection's opening and from each response, and is not reset by partial data, so a request whose
headers have not all arrived by then is closed with its connection.

:class:`LimitedTCPSite` is aiohttp's ``TCPSite`` serving through a :class:`ConnectionLimit`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from pied.api.errors import APIError

logger = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Time for a refused client's request to arrive: closing on unread data would reset the
# connection before the client reads the 503.
REFUSAL_LINGER_SECONDS = 1.0
SEND_BUFFER_BYTES = 64 << 10  # per connection (the kernel doubles it); an SSE stream needs little


def refusal_bytes() -> bytes:
    body = msgspec.json.encode(APIError(503, "The server has too many open connections; retry later.").body())
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class Refusal(asyncio.Protocol):
    """A connection over the cap: answer 503 and close (after reading what the client sends, so
    that closing does not reset the connection before it reads the answer)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(REFUSAL)
        asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, transport.close)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass  # read and dropped

    def eof_received(self) -> bool:
        self.transport.close()
        return False


REFUSAL = refusal_bytes()


class ConnectionLimit:
    """The protocol factory of the listening socket: aiohttp's ``web.Server`` under a cap."""

    def __init__(self, max_connections: int) -> None:
        self.server: web.Server | None = None  # the runner's, once it is set up (attach)
        self.max_connections = max_connections
        self._busy: dict[RequestHandler, int] = {}  # connection -> requests in progress on it
        self._evicted: set[RequestHandler] = set()  # closed by us, not yet gone from the server
        self.num_evicted = 0
        self.num_refused = 0

    @property
    def num_busy(self) -> int:
        """Connections with a request in progress."""
        return len(self._busy)

    def attach(self, server: web.Server) -> None:
        self.server = server

    def __call__(self) -> asyncio.Protocol:
        assert self.server is not None, "attach the runner's server first"
        try:
            return self._admit()
        except Exception:  # noqa: BLE001 - a factory that raises stops the listener accepting at all
            logger.exception("connection limit failed; accepting the connection")
            return self.server()

    def _admit(self) -> asyncio.Protocol:
        assert self.server is not None
        live = self.server.connections
        self._evicted.intersection_update(live)
        connections = [c for c in live if c not in self._evicted]
        if len(connections) >= self.max_connections:
            # Oldest first (aiohttp keeps them in the order they opened).
            idle = next((c for c in connections if c not in self._busy), None)
            if idle is None:
                self.num_refused += 1
                return Refusal()
            self._evicted.add(idle)
            self.num_evicted += 1
            idle.force_close()
        return self.server()

    @web.middleware
    async def track_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks a connection busy while one of its requests is answered (outermost middleware)."""
        protocol = request.protocol
        self._busy[protocol] = self._busy.get(protocol, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self._busy[protocol] - 1
            if left:
                self._busy[protocol] = left
            else:
                del self._busy[protocol]


class LimitedTCPSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through ``limit`` (attached to the runner's server)."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, limit: ConnectionLimit, backlog: int
    ) -> None:
        super().__init__(runner, host, port, backlog=backlog)
        assert runner.server is not None
        limit.attach(runner.server)
        self.limit = limit

    async def start(self) -> None:
        # As TCPSite.start, with the limit as the protocol factory.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.limit, self._host, self._port, backlog=self._backlog)
        for sock in self._server.sockets:
            # Accepted connections inherit it: bounded kernel memory per connection (autotuning
            # would grow it to megabytes), and a client that stops reading meets the write
            # deadline after a few hundred KiB rather than after megabytes of output.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
