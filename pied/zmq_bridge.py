"""One-way ZeroMQ forwarders between a machine's ``ipc://`` mailboxes and the ``tcp://`` links to
another machine (multi-node tensor parallelism, :mod:`pied.multinode`).

The actors stay as they are: each binds its mailbox where it always does and sends to the addresses
it is given. A :class:`Bridge` joins two endpoints with a PULL -> PUSH forwarder (``zmq.proxy``,
which moves frames in C on a thread of its own, without the GIL): on the head, what the scheduler
and the supervisor send to a remote rank's ``ipc://`` mailbox leaves on a TCP port that rank's node
connects to, and what remote ranks send to the supervisor, the scheduler and the memory manager
arrives on TCP ports and is handed to their ``ipc://`` mailboxes; on a node, the frames of a rank's
TCP port are handed to that rank's local ``ipc://`` mailbox. Frames are forwarded as they are
(msgpack), in order.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import zmq

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """Where one side of a forwarder is: ``bind`` it, or connect to it."""

    address: str
    bind: bool


class Bridge:
    """Forwarders, each from a PULL endpoint to a PUSH endpoint; ``close`` stops them all."""

    def __init__(self) -> None:
        self._context = zmq.Context()
        self._threads: list[threading.Thread] = []

    def forward(self, source: Endpoint, destination: Endpoint) -> None:
        """Everything that arrives at ``source`` goes on to ``destination``, in order. Binds (or
        connects) both now, so a sender that starts next finds them."""
        pull = self._socket(zmq.PULL, source)
        try:
            push = self._socket(zmq.PUSH, destination)
        except BaseException:
            pull.close(linger=0)  # close() terminates the context, which waits for every socket
            raise
        thread = threading.Thread(
            target=self._run, args=(pull, push), name=f"bridge {source.address}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _socket(self, kind: int, endpoint: Endpoint) -> zmq.Socket:
        socket = self._context.socket(kind)
        # Like the mailboxes: no high-water mark (a dropped plan or heartbeat would stall or kill
        # the engine), and nothing kept once the bridge closes.
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            if endpoint.bind:
                socket.bind(endpoint.address)
            else:
                socket.connect(endpoint.address)
        except zmq.ZMQError as error:
            socket.close()
            verb = "listen on" if endpoint.bind else "connect to"
            raise OSError(f"cannot {verb} {endpoint.address}: {error}") from None
        return socket

    @staticmethod
    def _run(pull: zmq.Socket, push: zmq.Socket) -> None:
        try:
            zmq.proxy(pull, push)
        except zmq.ContextTerminated:
            pass  # close() ended it
        except zmq.ZMQError as error:
            logger.error("bridge stopped: %s", error)
        finally:
            pull.close(linger=0)
            push.close(linger=0)

    def close(self) -> None:
        """Stop every forwarder and close its sockets (idempotent). NOTE: terminating the context
        is what makes ``zmq.proxy`` return in the forwarder threads; it waits for their sockets."""
        if self._context.closed:
            return
        self._context.term()
        for thread in self._threads:
            thread.join(5.0)
