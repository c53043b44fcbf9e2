"""Host segment descriptors, from the memory manager to the workers that map them, over a Unix
socket with SCM_RIGHTS (DESIGN.md "Host memory hygiene").

The ZeroMQ messages stay as they are: ``HostLease``/``SegmentUpdate`` name each segment with a
``HostSegmentInfo`` (its id and its memfd's number in the memory manager). The descriptor itself
travels here. A mapper asks for segment ``(segment_id, fd)`` and the memory manager answers with
the descriptor attached, or with "released" when that segment is gone already (it was released
before this mapper got to it, so no plan can use its blocks). Nothing goes through
``/proc/<pid>/fd``, so every worker can be non-dumpable (:mod:`workers.process_security`).

Pull, not push: a client has one request in flight, so the kernel's short queue of a
``SOCK_SEQPACKET`` socket (``net.unix.max_dgram_qlen`` messages) never fills, the memory manager's
loop never blocks on a busy mapper (an executor still loading its model), and no descriptor waits
in a queue for a segment its mapper never maps.

Address, derived from the memory manager's mailbox (:func:`channel_address`): ``ipc://DIR/memory.sock``
(processes) -> the socket file ``DIR/memory.fds`` in the engine's private 0700 runtime directory;
``inproc://NAME`` (actors as threads of one process) -> the abstract socket ``@pied-fds:NAME``.
Every connection's peer credentials (SO_PEERCRED) are checked: the same uid (processes) or the
same process (threads: an abstract socket has no file permissions).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

import proto

logger = logging.getLogger(__name__)

REQUEST = struct.Struct("<qq")  # segment_id, fd (its number in the memory manager)
REPLY = struct.Struct("<qqq")  # segment_id, fd, size in bytes (-1: released, no descriptor attached)
RELEASED = -1
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class FdChannelError(RuntimeError):
    """The memory manager could not hand over a segment's descriptor."""


def channel_address(memory_address: str) -> tuple[str, bool]:
    """``(socket name, in_process)`` of the fd channel beside the memory manager's mailbox."""
    if memory_address.startswith("ipc://"):
        path = memory_address[len("ipc://") :]
        stem = path[: -len(".sock")] if path.endswith(".sock") else path
        return stem + ".fds", False
    if memory_address.startswith("inproc://"):
        return "\0pied-fds:" + memory_address[len("inproc://") :], True
    raise ValueError(f"no fd channel for the memory manager's address {memory_address!r}: not ipc:// or inproc://.")


def _peer(connection: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end."""
    pid, uid, _ = _PEER_CREDENTIALS.unpack(
        connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    )
    return pid, uid


class FdServer:
    """The memory manager's end: answers each request with the segment's descriptor.

    ``lookup(segment_id, fd)`` gives ``(descriptor, size)`` of a live segment, ``None`` once it is
    released. Binds at construction (so a mapper that connects early waits in the backlog), serves
    from :meth:`start` on, on the calling thread's asyncio loop.
    """

    def __init__(self, memory_address: str, lookup: Callable[[int, int], tuple[int, int] | None]) -> None:
        self.name, self.in_process = channel_address(memory_address)
        self._lookup = lookup
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[socket.socket] = set()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.name)
            listener.listen(16)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener: socket.socket | None = listener

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._listener is not None
        self._loop = loop
        loop.add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        try:
            connection, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid = _peer(connection)
        trusted = pid == os.getpid() if self.in_process else uid == os.getuid()
        if not trusted:
            logger.warning("fd channel: refused a connection from pid %d (uid %d)", pid, uid)
            connection.close()
            return
        connection.setblocking(False)
        self._connections.add(connection)
        self._loop.add_reader(connection.fileno(), self._answer, connection)

    def _answer(self, connection: socket.socket) -> None:
        try:
            request = connection.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            request = b""
        if len(request) != REQUEST.size:
            if request:
                logger.warning("fd channel: dropped a client that sent a malformed request (%d bytes)", len(request))
            self._drop(connection)
            return
        segment_id, fd = REQUEST.unpack(request)
        found = self._lookup(segment_id, fd)
        try:
            if found is None:
                connection.send(REPLY.pack(segment_id, fd, RELEASED))
            else:
                descriptor, size = found
                socket.send_fds(connection, [REPLY.pack(segment_id, fd, size)], [descriptor])
        except OSError as error:
            # A client waits for each answer before it asks again, so its queue cannot be full:
            # one that floods (or went away) is dropped rather than blocking this loop.
            logger.warning("fd channel: dropped a client (%s)", error)
            self._drop(connection)

    def _drop(self, connection: socket.socket) -> None:
        if self._loop is not None:
            self._loop.remove_reader(connection.fileno())
        self._connections.discard(connection)
        connection.close()

    def close(self) -> None:
        for connection in list(self._connections):
            self._drop(connection)
        listener, self._listener = self._listener, None
        if listener is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(listener.fileno())
        listener.close()
        if not self.in_process:
            try:
                os.unlink(self.name)
            except FileNotFoundError:
                pass


class FdClient:
    """A mapper's end (the executor's): :meth:`open` returns a segment's descriptor, which the
    caller owns (and closes once mapped). Blocking, for one thread (the executor's compute thread);
    connects on first use, waiting up to ``timeout`` for the memory manager to listen."""

    def __init__(self, memory_address: str, timeout: float = 60.0) -> None:
        self.name, _ = channel_address(memory_address)
        self.timeout = timeout
        self._socket: socket.socket | None = None

    def open(self, info: proto.HostSegmentInfo) -> int | None:
        """The descriptor of segment ``info``; ``None`` if the memory manager released it already."""
        connection = self._connect()
        try:
            connection.send(REQUEST.pack(info.segment_id, info.fd))
            reply, fds, _, _ = socket.recv_fds(connection, 64, 1, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            self.close()  # a late answer would be read as the next one's
            raise FdChannelError(
                f"the memory manager did not hand over host segment {info.segment_id} within {self.timeout:g} s."
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            self.close()
            raise FdChannelError("the memory manager closed the host segment channel.") from None
        except OSError as error:
            self.close()
            raise FdChannelError(f"the host segment channel to the memory manager failed: {error}") from None
        if len(reply) != REPLY.size or REPLY.unpack(reply)[:2] != (info.segment_id, info.fd):
            for fd in fds:
                os.close(fd)
            self.close()
            if not reply:
                raise FdChannelError("the memory manager closed the host segment channel.")
            raise FdChannelError(f"the memory manager answered host segment {info.segment_id} with {reply!r}.")
        size = REPLY.unpack(reply)[2]
        if size == RELEASED:
            return None
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise FdChannelError(f"host segment {info.segment_id} came without its descriptor.")
        return fds[0]

    def _connect(self) -> socket.socket:
        if self._socket is not None:
            return self._socket
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                connection.connect(self.name)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                # The memory manager starts beside this worker and may not listen yet.
                if time.monotonic() > deadline:
                    connection.close()
                    raise FdChannelError(
                        f"no memory manager listens for host segment requests at {self.name!r} "
                        f"(waited {self.timeout:g} s)."
                    ) from None
                time.sleep(0.05)
        connection.settimeout(self.timeout)
        self._socket = connection
        return connection

    def close(self) -> None:
        connection, self._socket = self._socket, None
        if connection is not None:
            connection.close()
