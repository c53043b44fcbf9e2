"""The actor runtime every pied worker runs on (DESIGN.md "Processes").

An actor is one asyncio loop (uvloop when installed), one mailbox (a ZeroMQ PULL socket bound at the
actor's address) and handlers dispatched on the type of each decoded message. It sends through one
PUSH socket per peer address. The same actors can be wired

- over ``ipc://`` sockets in a private runtime directory, one actor per process
  (:func:`worker_main` is the process entry point), as the daemon does, or
- over ``inproc://`` in one process, each actor on its own loop in its own thread
  (:class:`ActorThread`) and all sharing one ``zmq.asyncio.Context``, for tests and library use.

Blocking work (model load, a forward pass) goes through :meth:`Actor.run_blocking`, which runs it on
the actor's single compute thread so the loop keeps answering abort, heartbeat and shutdown.

Lifetime: an actor that connects to a supervisor heartbeats to it from its loop, stops on
:class:`proto.Shutdown` (exit status 0) and, on an error it cannot handle, sends
:class:`proto.Dead` and stops with status 1. A worker process also exits when its parent dies
(end-of-file on the parent pipe), so no worker outlives the daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import select
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import msgspec
import zmq
import zmq.asyncio

import proto
from proto.config import EngineConfig
from workers.process_security import make_non_dumpable

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=msgspec.Struct)
Handler = Callable[[Any], Union[Awaitable[None], None]]

SUPERVISOR = "supervisor"  # the peer name every worker reports Ready/Heartbeat/Dead to
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_START = 2  # the start message is malformed or incomplete: nothing was started
EXIT_PARENT_DIED = 3


class PeerGoneError(RuntimeError):
    """A message could not be queued: the peer's mailbox is gone (it stopped)."""


@dataclass(frozen=True)
class Addresses:
    """The mailbox address of every actor of one engine. The frontend's mailbox is also where the
    supervisor listens (it lives in the daemon's process)."""

    frontend: str
    scheduler: str
    executor: str
    memory: str = ""  # the memory manager (host memory, the expansion controller)

    @classmethod
    def inproc(cls, prefix: str | None = None) -> Addresses:
        """Fresh ``inproc://`` addresses; actors using them must share one zmq Context."""
        prefix = prefix or f"pied-{uuid.uuid4().hex[:12]}"
        return cls(*(f"inproc://{prefix}/{name}" for name in ("frontend", "scheduler", "executor", "memory")))

    @classmethod
    def ipc(cls, socket: Callable[[str], str]) -> Addresses:
        """``ipc://`` addresses from a function naming a socket (``RuntimeDir.socket``)."""
        return cls(socket("frontend"), socket("scheduler"), socket("executor"), socket("memory"))


class StartMessageError(ValueError):
    """A worker's start message (its ``WorkerArgs``) is malformed or incomplete."""


class WorkerArgs(msgspec.Struct, kw_only=True):
    """What a worker process is started with: one JSON argument on its command line (no pickle).

    ``config`` carries the plan the daemon's preflight derived: a worker process builds from it
    and never derives one of its own (proto.plan), so a config without one is refused."""

    config: EngineConfig
    addresses: Addresses
    parent_fd: int = -1  # read end of the parent pipe; EOF on it means the parent died
    heartbeat_interval: float = 0.5
    log_level: str = "INFO"
    rank: int = 0  # an executor's tensor-parallel rank (workers.roster names rank r's worker)

    @classmethod
    def decode(cls, message: str | bytes) -> WorkerArgs:
        """The start message, decoded and checked; ``StartMessageError`` says what is wrong."""
        try:
            args = msgspec.json.decode(message, type=cls)
        except msgspec.ValidationError as error:  # valid JSON, not a WorkerArgs
            raise StartMessageError(f"it does not match WorkerArgs: {error}") from None
        except msgspec.DecodeError as error:
            raise StartMessageError(f"it is not valid JSON: {error}") from None
        return args.check()

    def check(self) -> WorkerArgs:
        if self.config.plan is None:
            raise StartMessageError(
                "its config carries no plan; a worker process builds from the plan the daemon's "
                "preflight derived (pied.preflight), it never derives one itself."
            )
        try:
            self.config.validate()
        except ValueError as error:
            raise StartMessageError(f"its config is invalid: {error}") from None
        for name in ("frontend", "scheduler", "executor"):
            if not getattr(self.addresses, name):
                raise StartMessageError(f"addresses.{name} is empty.")
        if not 0 <= self.rank < self.config.tensor_parallel_size:
            raise StartMessageError(
                f"rank {self.rank} is not in [0, {self.config.tensor_parallel_size}) "
                f"(--tensor-parallel-size {self.config.tensor_parallel_size})."
            )
        if not 0 < self.heartbeat_interval < float("inf"):
            raise StartMessageError(
                f"heartbeat_interval must be a positive number of seconds, got {self.heartbeat_interval}."
            )
        if self.parent_fd < -1:
            raise StartMessageError(f"parent_fd must be a file descriptor or -1, got {self.parent_fd}.")
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise StartMessageError(f"log_level {self.log_level!r} is not a logging level (DEBUG, INFO, ...).")
        return self


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh (uv)loop owned by the calling thread."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


class Actor:
    """An actor: a mailbox at ``address`` and handlers registered with :meth:`on`.

    Subclasses register handlers in ``__init__`` and override :meth:`on_start` / :meth:`on_stop`.
    Handlers run one at a time in mailbox order; a handler may be a coroutine function, in which
    case the next message waits until it returns, so long work must be started with :meth:`spawn`
    (and blocking work with :meth:`run_blocking`) instead of awaited in the handler.

    NOTE: every method except :meth:`stop_threadsafe` must be called from the actor's own loop
    thread: ZeroMQ sockets are not thread-safe and the actor's state has no locks.
    """

    def __init__(
        self,
        name: str,
        address: str,
        *,
        context: zmq.asyncio.Context | None = None,
        supervisor: str | None = None,
        heartbeat_interval: float = 0.5,
    ) -> None:
        self.name = name
        self.address = address
        self._owns_context = context is None
        self.context = context if context is not None else zmq.asyncio.Context()
        self.heartbeat_interval = heartbeat_interval
        self.exit_code = EXIT_OK
        # The first error that failed the actor, as raised: in a thread, the supervisor hands it to
        # the caller as is (a ModelFolderError naming the file stays one).
        self.failure: BaseException | None = None
        self._handlers: dict[type, Handler] = {}
        self._peers: dict[str, str] = {}  # peer name -> address
        self._outboxes: dict[str, zmq.Socket] = {}  # peer name -> PUSH socket (shared per address)
        self._encoder = msgspec.msgpack.Encoder()
        self._mailbox: zmq.asyncio.Socket | None = None
        self._decoder: msgspec.msgpack.Decoder[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = threading.Event()  # for stop_threadsafe before the loop runs
        self._tasks: set[asyncio.Task[Any]] = set()
        self._compute: concurrent.futures.ThreadPoolExecutor | None = None
        self.started = threading.Event()  # set once the mailbox is bound and the loop runs
        self.on(proto.Shutdown, self._handle_shutdown)
        if supervisor is not None:
            self.connect(SUPERVISOR, supervisor)

    # ---------------------------------------------------------------- wiring

    def on(self, message_type: type[M], handler: Callable[[M], Awaitable[None] | None]) -> None:
        """Dispatch messages of ``message_type`` to ``handler``. Register before :meth:`run`: the
        mailbox decoder is built from the registered types."""
        if self._mailbox is not None:
            raise RuntimeError(f"{self.name}: handlers must be registered before the actor runs")
        self._handlers[message_type] = handler

    def connect(self, peer: str, address: str) -> None:
        """Name a peer. Peers sharing an address share one socket, so what this actor sends to
        them arrives in the order it was sent."""
        if peer in self._peers:
            if self._peers[peer] != address:
                raise ValueError(f"{self.name}: peer {peer!r} is already connected to {self._peers[peer]}")
            return
        self._peers[peer] = address
        if self._mailbox is not None:
            self._open_outbox(peer, address)

    def bind(self) -> None:
        """Bind the mailbox now (``run`` does it otherwise), so peers that connect later find it."""
        if self._mailbox is not None:
            return
        types = tuple(self._handlers)
        self._decoder = msgspec.msgpack.Decoder(Union[types])  # type: ignore[valid-type]
        mailbox = self.context.socket(zmq.PULL)
        # No high-water mark: a mailbox that drops or blocks would lose tokens or stall the sender;
        # the queue is bounded by the requests in flight anyway.
        mailbox.setsockopt(zmq.RCVHWM, 0)
        mailbox.setsockopt(zmq.LINGER, 0)
        mailbox.bind(self.address)
        self._mailbox = mailbox
        for peer, address in self._peers.items():
            self._open_outbox(peer, address)

    def _open_outbox(self, peer: str, address: str) -> None:
        for other, other_address in self._peers.items():
            if other != peer and other_address == address and other in self._outboxes:
                self._outboxes[peer] = self._outboxes[other]
                return
        # A plain (synchronous) socket: with no high-water mark a non-blocking send never waits,
        # so sending needs no await and handlers can stay synchronous.
        socket = zmq.Socket(self.context, zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.LINGER, 500)  # lets a last Dead/Ready leave before the process exits
        socket.connect(address)
        self._outboxes[peer] = socket

    # ---------------------------------------------------------------- in a handler

    def send(self, peer: str, message: msgspec.Struct) -> None:
        """Queue ``message`` for ``peer``; never blocks. Messages to one peer keep their order.
        Raises :class:`PeerGoneError` when the peer's mailbox no longer exists (an ``inproc://``
        peer that stopped; over ``ipc://`` messages queue until it comes back)."""
        try:
            self._outboxes[peer].send(self._encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise PeerGoneError(f"the {peer} takes no messages: its mailbox is closed") from None

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a task of this actor: cancelled when it stops; if it raises, the
        actor fails (an unexpected error leaves state nobody can vouch for)."""
        assert self._loop is not None, "spawn() before the actor runs"
        task = self._loop.create_task(coroutine, name=f"{self.name}:{name or coroutine.__name__}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def run_blocking(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` on this actor's compute thread and await its result.

        NOTE: one thread per actor: blocking calls run one at a time in the order they were made,
        and thread-bound device state (the current CUDA device and stream) is the same for the
        model load and every forward pass. The loop stays free meanwhile (torch releases the GIL).
        """
        if self._compute is None:
            self._compute = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"{self.name}-compute"
            )
        assert self._loop is not None
        return await self._loop.run_in_executor(self._compute, function, *args)

    def stop(self, exit_code: int = EXIT_OK) -> None:
        """Stop after the current handler; the first non-zero exit code sticks."""
        if exit_code and not self.exit_code:
            self.exit_code = exit_code
        self._stop_requested.set()
        if self._stop_event is not None:
            self._stop_event.set()

    def stop_threadsafe(self, exit_code: int = EXIT_OK) -> None:
        """:meth:`stop` from any thread."""
        # NOTE: the flag first, then the loop: run() reads them in the opposite order, so either
        # run() sees the flag or this sees the loop.
        self._stop_requested.set()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.stop, exit_code)
        except RuntimeError:  # the loop closed in between: the actor has stopped already
            pass

    def fail(self, reason: str) -> None:
        """Report an unrecoverable error to the supervisor (if any) and stop with status 1."""
        if self.stopping:
            return
        logger.error("%s failed: %s", self.name, reason)
        if SUPERVISOR in self._outboxes:
            self.send(SUPERVISOR, proto.Dead(worker=self.name, reason=reason))
        self.stop(EXIT_FAILED)

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    # ---------------------------------------------------------------- to override

    async def on_start(self) -> None:
        """Runs as a task once the mailbox is bound (messages are handled meanwhile)."""

    async def on_stop(self) -> None:
        """Runs after every task of the actor is cancelled, before its sockets close."""

    # ---------------------------------------------------------------- the loop

    async def run(self) -> int:
        """Serve the mailbox until stopped; returns the exit status (0 after Shutdown)."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_requested.is_set():
            self._stop_event.set()
        try:
            self.bind()
            self.started.set()
            self.spawn(self._receive(), "receive")
            if SUPERVISOR in self._outboxes:
                self.spawn(self._heartbeat(), "heartbeat")
            self.spawn(self.on_start(), "on_start")
            await self._stop_event.wait()
        finally:
            await self._close()
        return self.exit_code

    async def _receive(self) -> None:
        mailbox = self._mailbox
        assert mailbox is not None and self._decoder is not None
        decode = self._decoder.decode
        handlers = self._handlers
        while True:
            data = await mailbox.recv()
            try:
                message = decode(data)
            except msgspec.DecodeError as error:
                # A malformed message cannot be attributed to a request; drop it, stay up.
                logger.warning(
                    "%s: dropped an undecodable message (%d bytes): %s", self.name, len(data), error
                )
                continue
            result = handlers[type(message)](message)
            if result is not None:
                await result

    async def _heartbeat(self) -> None:
        # NOTE: sent from the loop itself, not a helper thread, so a wedged loop or a stopped
        # process goes silent and the supervisor notices.
        seq = 0
        while True:
            self.send(SUPERVISOR, proto.Heartbeat(worker=self.name, seq=seq, time=time.monotonic()))
            seq += 1
            await asyncio.sleep(self.heartbeat_interval)

    def _handle_shutdown(self, message: proto.Shutdown) -> None:
        logger.info("%s: shutting down (%s)", self.name, message.reason or "requested")
        self.stop(EXIT_OK)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.error("%s: task %s failed", self.name, task.get_name(), exc_info=error)
            if self.failure is None and not self.stopping:
                self.failure = error
            self.fail(f"{type(error).__name__}: {error}")

    async def _close(self) -> None:
        self.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.on_stop()
        except Exception:
            logger.exception("%s: on_stop failed", self.name)
        if self._mailbox is not None:
            self._mailbox.close(linger=0)
        for socket in set(self._outboxes.values()):
            socket.close()
        self._outboxes.clear()
        if self._compute is not None:
            # A forward pass still running cannot be interrupted; do not wait for it.
            self._compute.shutdown(wait=False, cancel_futures=True)
        if self._owns_context:
            self.context.term()


class ActorThread:
    """An actor on its own event loop in a daemon thread: the ``inproc://`` wiring.

    Actors wired this way must share one ``zmq.asyncio.Context`` (inproc endpoints are per
    context). ``start`` returns once the mailbox is bound; ``stop`` asks the actor to stop and joins.
    """

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"actor-{actor.name}", daemon=True)

    def start(self, timeout: float = 10.0) -> ActorThread:
        self._thread.start()
        if not self.actor.started.wait(timeout) and self.error is None:
            raise TimeoutError(f"actor {self.actor.name} did not start within {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"actor {self.actor.name} failed to start") from self.error
        return self

    def _main(self) -> None:
        try:
            self.exit_code = run_loop(self.actor.run())
        except BaseException as error:
            self.error = error
            self.exit_code = EXIT_FAILED
            self.actor.started.set()  # unblock start()
            logger.exception("actor %s crashed", self.actor.name)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop the actor and join its thread; False if it did not end within ``timeout``."""
        self.actor.stop_threadsafe()
        return self.join(timeout)


# -------------------------------------------------------------------- worker processes


def watch_parent(fd: int) -> None:
    """Exit this process as soon as the parent pipe reaches end-of-file (the parent died).

    A thread rather than a loop reader: it works even if the loop is wedged, and ``os._exit`` ends
    the process while a forward pass is still running in its thread. It also checks once a second
    that the parent is still ours: a child the daemon forked without exec would hold the pipe's
    write end too and delay the EOF, but not our reparenting.
    """
    parent_pid = os.getppid()

    def wait_for_eof() -> None:
        while True:
            try:
                readable, _, _ = select.select([fd], [], [], 1.0)
                if readable and not os.read(fd, 64):
                    break
            except OSError:
                break
            if os.getppid() != parent_pid:
                break
        print(f"pied worker {os.getpid()}: parent process died, exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_PARENT_DIED)

    threading.Thread(target=wait_for_eof, name="parent-watch", daemon=True).start()


def worker_main(name: str, build: Callable[[WorkerArgs], Actor], argv: list[str] | None = None) -> int:
    """Entry point of a worker process: ``python -m workers.<name> '<WorkerArgs JSON>'``.

    A malformed or incomplete start message returns ``EXIT_BAD_START`` with one line on stderr
    saying what is wrong, before anything starts. Otherwise never returns normally: exits with the
    actor's status via ``os._exit``, so a forward pass stuck in the compute thread cannot keep the
    process alive after the actor stopped.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m workers.{name} '<WorkerArgs as JSON>'", file=sys.stderr)
        return EXIT_BAD_START
    try:
        args = WorkerArgs.decode(argv[0])
    except StartMessageError as error:
        print(f"pied {name} worker {os.getpid()}: bad start message: {error}", file=sys.stderr, flush=True)
        return EXIT_BAD_START
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The supervisor alone decides when a worker stops (a Shutdown message, or its own death seen
    # on the parent pipe). Ctrl-C reaches the whole process group, and systemd's default
    # KillMode=control-group sends SIGTERM to every process of the unit while the daemon drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.parent_fd >= 0:
        watch_parent(args.parent_fd)
    make_non_dumpable()  # before any model weight, host KV or prompt reaches this process
    exit_code = EXIT_FAILED
    try:
        actor = build(args)
        exit_code = run_loop(actor.run())
    except BaseException:
        logger.exception("%s crashed", name)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
