"""The node link: one TCP connection from each node (K > 0) to the head, the parent pipe across
machines (:mod:`pied.multinode`).

A node connects and says ``Hello``; the head answers with its checked configuration (``Welcome``)
or why it will not take the node (``Refused``: the node exits 2). From then on both ends send a
``Ping`` every heartbeat interval, and each counts the other as gone when the connection closes or
stays silent past the heartbeat timeout: the head then fails every request and exits non-zero (as
for a local rank), a node stops its ranks and exits non-zero. The node reports each of its ranks'
start and exit (``Started``, ``Exited``); the head says ``Stop`` (status 0 for a requested shutdown, 1 when its engine
died) before it stops its workers, and may ``Kill`` a hung rank. Messages are JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Union

import msgspec

from proto.config import EngineConfig

logger = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a configuration with its plan is a few kilobytes


class Hello(msgspec.Struct, tag=True):
    node_rank: int
    nnodes: int
    tensor_parallel_size: int


class Welcome(msgspec.Struct, tag=True):
    config: EngineConfig  # the head's, checked, with its plan


class Refused(msgspec.Struct, tag=True):
    reason: str


class Ping(msgspec.Struct, tag=True):
    pass


class Started(msgspec.Struct, tag=True):
    """A node started one of its ranks as process ``pid`` (on its machine)."""

    worker: str
    pid: int


class Exited(msgspec.Struct, tag=True):
    """A node's rank ended: ``description`` as the supervisor words it (``was killed by SIGKILL``)."""

    worker: str
    pid: int
    status: int
    description: str


class Stop(msgspec.Struct, tag=True):
    status: int  # what the node exits with once its ranks stopped
    reason: str


class Kill(msgspec.Struct, tag=True):
    worker: str


LinkMessage = Union[Hello, Welcome, Refused, Ping, Started, Exited, Stop, Kill]
_decoder = msgspec.json.Decoder(LinkMessage)
_encoder = msgspec.json.Encoder()


class LinkClosed(ConnectionError):
    """The other end closed the link or stayed silent past the heartbeat timeout."""


class Link:
    """One end of a node link over asyncio streams: ``send``; ``receive`` the next message other
    than a Ping (every message counts as a sign of life); ``watch`` pings and checks silence."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_heard = time.monotonic()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def send(self, message: LinkMessage) -> None:
        if not self.writer.is_closing():
            self.writer.write(_encoder.encode(message) + b"\n")

    async def receive(self) -> LinkMessage:
        """The next message other than a Ping; LinkClosed at end of file or on a garbled line."""
        while True:
            try:
                line = await self.reader.readuntil(b"\n")
            except (asyncio.IncompleteReadError, ConnectionError) as error:
                raise LinkClosed(f"the connection from {self.peer} closed") from error
            except asyncio.LimitOverrunError:
                raise LinkClosed(f"{self.peer} sent a line over {MAX_LINE} bytes") from None
            self.last_heard = time.monotonic()
            try:
                message = _decoder.decode(line)
            except msgspec.DecodeError as error:
                raise LinkClosed(f"{self.peer} sent an undecodable message: {error}") from None
            if not isinstance(message, Ping):
                return message

    async def keep_alive(self, interval: float, timeout: float) -> None:
        """Ping every ``interval``; returns once nothing was heard for ``timeout`` seconds."""
        while True:
            self.send(Ping())
            expected = time.monotonic() + interval
            await asyncio.sleep(interval)
            now = time.monotonic()
            # NOTE: after a late tick (this loop was blocked) the peer's pings may still be unread:
            # silence is evidence only when this tick ran on time.
            if now - expected <= interval and now - self.last_heard > timeout:
                return

    def close(self) -> None:
        self.writer.close()


async def open_link(host: str, port: int, hello: Hello, timeout: float) -> tuple[Link, EngineConfig]:
    """A node's end: connect (retrying until ``timeout``: the head may start later), say hello and
    get the head's configuration. ``Refused`` raises ValueError with the head's reason."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_LINE)
            break
        except OSError as error:
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"no head listens at {host}:{port} (tried for {timeout:g} s: {error})"
                ) from None
            await asyncio.sleep(0.2)
    link = Link(reader, writer)
    link.send(hello)
    try:
        answer = await asyncio.wait_for(link.receive(), max(1.0, deadline - time.monotonic()))
    except BaseException:
        link.close()
        raise
    if isinstance(answer, Refused):
        link.close()
        raise ValueError(answer.reason)
    if not isinstance(answer, Welcome):
        link.close()
        raise ConnectionError(f"the head answered the handshake with {type(answer).__name__}")
    return link, answer.config


class HeadLinks:
    """The head's end: accepts nodes, answers their hello with ``check(hello)`` (a configuration, or
    the reason to refuse), then hands every later message to ``on_message(node_rank, message)`` and
    a lost link to ``on_lost(node_rank, reason)``."""

    def __init__(
        self,
        check: Callable[[Hello], EngineConfig | str],
        on_message: Callable[[int, LinkMessage], None],
        on_lost: Callable[[int, str], None],
        heartbeat_interval: float,
        heartbeat_timeout: float,
    ) -> None:
        self._check = check
        self._on_message = on_message
        self._on_lost = on_lost
        self._interval = heartbeat_interval
        self._timeout = heartbeat_timeout
        self.links: dict[int, Link] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, port=port, limit=MAX_LINE, reuse_address=True)
        except OSError as error:
            raise OSError(f"cannot listen for nodes on port {port}: {error}") from None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = Link(reader, writer)
        node = -1
        try:
            hello = await asyncio.wait_for(link.receive(), self._timeout)
            if not isinstance(hello, Hello):
                raise LinkClosed(f"{link.peer} did not start with Hello")
            answer = self._check(hello)
            if not isinstance(answer, EngineConfig) or hello.node_rank in self.links or self._closing:
                reason = answer if isinstance(answer, str) else f"node {hello.node_rank} is connected already"
                logger.error("refused node %d from %s: %s", hello.node_rank, link.peer, reason)
                link.send(Refused(reason))
                await writer.drain()
                return
            node = hello.node_rank
            self.links[node] = link
            link.send(Welcome(answer))
            logger.info("node %d joined from %s", node, link.peer)
            await self._follow(node, link)
        except (LinkClosed, asyncio.TimeoutError, ConnectionError) as error:
            if node >= 0 and not self._closing:
                self._on_lost(node, str(error) or "its link closed")
        finally:
            self._tasks.discard(task)
            link.close()

    async def _follow(self, node: int, link: Link) -> None:
        alive = asyncio.ensure_future(link.keep_alive(self._interval, self._timeout))
        try:
            while True:
                receive = asyncio.ensure_future(link.receive())
                await asyncio.wait([receive, alive], return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    raise LinkClosed(f"node {node} ({link.peer}) sent nothing for {self._timeout:g} s (hung?)")
                self._on_message(node, receive.result())
        finally:
            alive.cancel()

    def send(self, node: int, message: LinkMessage) -> None:
        link = self.links.get(node)
        if link is not None:
            link.send(message)

    def stop(self, status: int, reason: str) -> None:
        """Tell every node to stop its ranks and exit with ``status`` (sent before the head stops its
        own workers: a node's ranks then stop as asked, not as orphans)."""
        for link in self.links.values():
            link.send(Stop(status, reason))

    async def close(self) -> None:
        self._closing = True
        for link in self.links.values():
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(link.writer.drain(), 1.0)
            link.close()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
