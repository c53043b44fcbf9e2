"""Starts the engine's workers, handshakes with them, watches them and stops them.

The same three actors (``workers.roster``) run either way, with the same handshake, liveness
checks and failure semantics:

- ``workers="processes"`` (the daemon): one process per worker, over ``ipc://`` sockets in a private
  runtime directory;
- ``workers="threads"`` (``pied.LLM``, ``pied serve --inproc``, tests): each actor on its own loop in
  an :class:`~workers.actor.ActorThread` of this process, over ``inproc://``, all sharing this
  supervisor's ``zmq.asyncio.Context``.

The supervisor lives on the frontend's event loop, behind the frontend's mailbox (an actor of its
own, bound at ``Addresses.frontend``)::

    frontend/supervisor ──AddRequest, AbortRequests, Shutdown──► scheduler ──StepPlan──► executor
          ▲   ▲                                                    │   ▲                    │
          │   └───────TokenDeltas, Stats, Ready, Heartbeat, Dead───┘   └─────StepResult─────┤
          └────────────────────────Ready, Heartbeat, Dead (Shutdown ►)──────────────────────┘

Failure model: a worker that exits (a process, or a thread whose actor stopped), sends Dead, or
stops heartbeating for ``heartbeat_timeout`` seconds (hung, or SIGSTOPped) makes the engine dead:
``on_dead(reason)`` is called at once (the client fails every request in flight), then the other
workers are stopped. Dead is final. Worker processes exit on their own when this process dies
(end-of-file on the parent pipe), so none is ever orphaned; worker threads die with it.

Across machines (``--nnodes N``, :mod:`pied.multinode`) this supervisor is the head's: it starts
only node 0's ranks and watches the others as :class:`RemoteWorker` s, through their heartbeats
(forwarded over TCP by a :class:`~pied.zmq_bridge.Bridge`) and their node's link
(:mod:`pied.node_link`): a node whose link closes or goes silent, or that reports a rank's exit,
kills the engine like a local rank's death, and every node stops when this supervisor stops or dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import msgspec
import zmq.asyncio

import proto
import workers
from pied.multinode import HeadEndpoint, head_endpoint, node_of
from pied.node_link import Exited, HeadLinks, Hello, Kill, LinkMessage, Started
from pied.runtime_dir import RuntimeDir
from pied.sdnotify import SYSTEMD_ONLY_VARIABLES
from pied.zmq_bridge import Bridge, Endpoint
from proto.config import ConfigError, EngineConfig
from workers.actor import EXIT_FAILED, Actor, ActorThread, Addresses, WorkerArgs
from workers.roster import (
    WORKER_NAMES,
    build_actor,
    preload,
    rank_of,
    role,
    worker_address,
    worker_args,
    worker_names,
)

logger = logging.getLogger(__name__)

__all__ = ["WORKER_NAMES", "Supervisor", "SupervisorOptions", "WorkerKind", "WorkerStartError"]

WorkerKind = Literal["processes", "threads"]
STOP_STAGES = (("scheduler", "executor"), ("memory",))  # see Supervisor._stop_workers
WORKER_KINDS: tuple[WorkerKind, ...] = ("processes", "threads")


class WorkerStartError(RuntimeError):
    """A worker did not become ready (it exited, failed, hung, or timed out during start)."""


@dataclass
class SupervisorOptions:
    """Timing of the handshake, liveness checks and shutdown, in seconds."""

    startup_timeout: float = 600.0  # until every worker is Ready; loading a large model takes a while
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 10.0  # silence after which a ready worker counts as hung
    # Before Ready the bar is lower: loading a model can hold the GIL in C code (imports, CUDA init,
    # weight copies) for seconds at a time; a hang there is caught by this or by startup_timeout.
    startup_heartbeat_timeout: float = 60.0
    shutdown_timeout: float = 10.0  # after Shutdown, before SIGKILL
    # A heartbeat older than this makes the engine unhealthy (the systemd watchdog pings pause)
    # though not yet dead; capped at heartbeat_timeout.
    healthy_heartbeat_age: float = 2.0
    log_level: str = "INFO"
    runtime_parent: str | None = None  # where the runtime directory is made (default: see runtime_dir)

    def __post_init__(self) -> None:
        if min(self.heartbeat_timeout, self.startup_heartbeat_timeout) <= self.heartbeat_interval:
            raise ValueError("heartbeat timeouts must be longer than heartbeat_interval")


class Worker(Protocol):
    """One running worker, a process or a thread, as the supervisor watches it."""

    name: str
    ready: proto.Ready | None
    last_heartbeat: float | None  # time.monotonic() of the last sign of life; None before the first
    killed: bool  # we stopped it by force (so its exit is no news)

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None:
        """Its exit status once it has ended, else None."""

    def describe_exit(self) -> str: ...

    def kill(self) -> None:
        """Stop it without its cooperation (SIGKILL; for a thread, stop its loop)."""

    @property
    def failure(self) -> BaseException | None:
        """The exception that failed it, where this process can see it (threads only)."""


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    ready: proto.Ready | None = None
    last_heartbeat: float | None = None
    killed: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def describe_exit(self) -> str:
        return describe_exit(self.process.returncode)

    def kill(self) -> None:
        self.killed = True
        self.process.kill()

    @property
    def failure(self) -> BaseException | None:
        return None  # only the Dead message's text crosses the process boundary


@dataclass
class WorkerThread:
    name: str
    thread: ActorThread
    ready: proto.Ready | None = None
    last_heartbeat: float | None = None
    killed: bool = field(default=False)

    @property
    def pid(self) -> int:
        return os.getpid()

    def poll(self) -> int | None:
        if self.thread.is_alive():
            return None
        return EXIT_FAILED if self.thread.exit_code is None else self.thread.exit_code

    def describe_exit(self) -> str:
        return f"thread stopped with status {self.poll()}"

    def kill(self) -> None:
        # NOTE: a thread cannot be killed; its loop is asked to stop (a wedged loop never will, and
        # the thread, a daemon thread, then ends with the process).
        self.killed = True
        self.thread.actor.stop_threadsafe(EXIT_FAILED)

    @property
    def failure(self) -> BaseException | None:
        return self.thread.actor.failure or self.thread.error


@dataclass
class RemoteWorker:
    """A rank on another machine (node ``node``): its Ready and heartbeats arrive over TCP; its exit
    is what its node reports, or the loss of that node's link."""

    name: str
    node: int
    links: HeadLinks
    ready: proto.Ready | None = None
    last_heartbeat: float | None = None
    killed: bool = field(default=False)
    exit_status: int | None = None
    exit_description: str = ""
    reported_pid: int = -1

    @property
    def pid(self) -> int:
        return self.ready.pid if self.ready is not None else self.reported_pid

    def poll(self) -> int | None:
        return self.exit_status

    def describe_exit(self) -> str:
        return f"on node {self.node} {self.exit_description}"

    def ended(self, status: int, description: str) -> None:
        if self.exit_status is None:
            self.exit_status, self.exit_description = status, description

    def kill(self) -> None:
        self.killed = True
        self.links.send(self.node, Kill(self.name))

    @property
    def failure(self) -> BaseException | None:
        return None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def distributed_environment(config: EngineConfig, environment: dict[str, str]) -> dict[str, str]:
    """torch.distributed's ``env://`` rendezvous for the executor ranks: ``MASTER_ADDR`` and
    ``MASTER_PORT`` as given to the daemon (torchrun's vocabulary), else this machine and a free port."""
    if config.tensor_parallel_size == 1 or config.distributed_init_method != "env://":
        return {}
    address = environment.get("MASTER_ADDR") or "127.0.0.1"
    port = environment.get("MASTER_PORT") or str(free_port(address))
    return {"MASTER_ADDR": address, "MASTER_PORT": port}


def rank_environment(config: EngineConfig, local_rank: int) -> dict[str, str]:
    """One rank's torchrun variables (ranks numbered node by node)."""
    size = config.tensor_parallel_size
    ranks_per_node = size // config.nnodes
    return {
        "RANK": str(config.node_rank * ranks_per_node + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(size),
        "LOCAL_WORLD_SIZE": str(ranks_per_node),
    }


def worker_environment() -> dict[str, str]:
    """This process's environment as its workers get it: without systemd's variables meant for the
    daemon alone, with ``-m workers.<name>`` importable from wherever the daemon was started."""
    environment = {name: value for name, value in os.environ.items() if name not in SYSTEMD_ONLY_VARIABLES}
    source_root = str(Path(workers.__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, environment.get("PYTHONPATH")]))
    return environment


def spawn_worker(name: str, args: WorkerArgs, parent_fd: int, environment: dict[str, str]) -> subprocess.Popen[bytes]:
    """Worker ``name``'s process, holding the read end ``parent_fd`` of its parent pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", f"workers.{role(name)}", msgspec.json.encode(args).decode()],
        pass_fds=(parent_fd,),
        stdin=subprocess.DEVNULL,
        env=environment,
    )


def free_port(address: str) -> int:
    # NOTE: free when asked; rank 0's store binds it a moment later (torchrun's standalone mode does the same).
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def kill_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Last resort at interpreter exit or garbage collection: no worker survives its supervisor."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


class Supervisor:
    """Runs the engine's workers as processes or threads. All methods run on the frontend's loop.

    ``on_output`` receives the scheduler's TokenDeltas and Stats; ``on_dead`` is called once, with a
    human-readable reason, when the engine dies (never on a requested shutdown).
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        on_output: Callable[[proto.TokenDeltas | proto.Stats], None],
        on_dead: Callable[[str], None],
        options: SupervisorOptions | None = None,
        workers: WorkerKind = "processes",
    ) -> None:
        if workers not in WORKER_KINDS:
            raise ValueError(f"workers must be one of {', '.join(WORKER_KINDS)}, got {workers!r}")
        if workers == "threads" and config.tensor_parallel_size > 1:
            # torch.distributed joins processes: one process holds one rank.
            raise ConfigError(
                f"--tensor-parallel-size {config.tensor_parallel_size} needs worker processes (one per rank), "
                "not threads; use workers='processes' (pied serve without --inproc)."
            )
        if config.node_rank > 0:
            # A node other than the head runs its ranks only, under pied.node, not a whole engine.
            raise ConfigError(
                f"--node-rank {config.node_rank} runs only this node's executor ranks: start it with "
                "`pied serve ... --node-rank K`; the engine (and pied.LLM, pied generate) runs on node 0."
            )
        self.config = config
        self.options = options or SupervisorOptions()
        self.kind: WorkerKind = workers
        self.dead = False
        self.dead_reason = ""
        self.model_info: proto.Ready | None = None  # the scheduler's Ready
        self.workers: dict[str, Worker] = {}
        self._failure: BaseException | None = None  # the exception that killed a worker thread
        self._on_output = on_output
        self._on_dead = on_dead
        self._runtime_dir: RuntimeDir | None = None
        self._addresses: Addresses | None = None
        self._context: zmq.asyncio.Context | None = None
        self._actor: Actor | None = None
        self._actor_task: asyncio.Task[int] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._all_ready: asyncio.Future[None] | None = None
        self._parent_pipe_write: int | None = None
        self._links: HeadLinks | None = None  # nodes 1..N-1 (--nnodes above 1)
        self._bridge: Bridge | None = None
        self._closing = False
        self._closed = False

    # ---------------------------------------------------------------- public

    @property
    def pids(self) -> dict[str, int]:
        return {name: worker.pid for name, worker in self.workers.items()}

    @property
    def closed(self) -> bool:
        """True from the moment shutdown() begins."""
        return self._closing

    @property
    def addresses(self) -> Addresses | None:
        return self._addresses

    def actor(self, name: str) -> Actor:
        """Worker ``name``'s actor object (threads only): tests and benchmarks read its state, as
        they would any object of this process, while the engine is idle."""
        worker = self.workers[name]
        if not isinstance(worker, WorkerThread):
            raise RuntimeError(f"the {name} runs in another process; only thread workers can be reached")
        return worker.thread.actor

    def heartbeats_fresh(self) -> bool:
        """Every worker is ready and was heard from within ``healthy_heartbeat_age`` (what the
        systemd watchdog pings stand for)."""
        if self.dead or self._closing or not self.workers:
            return False
        options = self.options
        # At least two intervals, so one heartbeat delayed by a busy loop does not count.
        max_age = min(
            max(options.healthy_heartbeat_age, 2 * options.heartbeat_interval), options.heartbeat_timeout
        )
        now = time.monotonic()
        return all(
            worker.ready is not None
            and worker.last_heartbeat is not None
            and now - worker.last_heartbeat <= max_age
            for worker in self.workers.values()
        )

    def _silent(self, worker: Worker) -> bool:
        """A ready worker not heard from for longer than a healthy one ever is: stopped or wedged."""
        options = self.options
        max_age = max(options.healthy_heartbeat_age, 2 * options.heartbeat_interval)
        heard = worker.last_heartbeat
        return worker.ready is not None and heard is not None and time.monotonic() - heard > max_age

    def progress(self) -> str:
        """Each worker's stage, for status lines while starting: ``executor loading, scheduler ready``."""
        stages = []
        for name, worker in self.workers.items():
            if worker.ready is not None:
                stage = "ready"
            elif worker.last_heartbeat is not None:
                stage = "loading"
            else:
                stage = "starting"
            stages.append(f"{name} {stage}")
        return ", ".join(stages) or "starting workers"

    async def start(self) -> proto.Ready:
        """Start every worker and wait until all are Ready; returns the scheduler's Ready (model
        info). Raises :class:`WorkerStartError` (after stopping whatever did start) on failure."""
        if self._addresses is not None:
            raise RuntimeError("Supervisor.start() can only be called once")
        loop = asyncio.get_running_loop()
        options = self.options
        if self.kind == "processes":
            self._runtime_dir = RuntimeDir(options.runtime_parent)
            addresses = self._addresses = Addresses.ipc(self._runtime_dir.socket)
        else:
            addresses = self._addresses = Addresses.inproc()
        # Thread workers share it: inproc:// endpoints exist only within one context.
        self._context = zmq.asyncio.Context()
        actor = Actor("frontend", addresses.frontend, context=self._context)
        actor.on(proto.TokenDeltas, self._on_output)
        actor.on(proto.Stats, self._on_output)
        actor.on(proto.Ready, self._handle_ready)
        actor.on(proto.Heartbeat, self._handle_heartbeat)
        actor.on(proto.Dead, self._handle_dead)
        for name in worker_names(self.config):
            actor.connect(name, worker_address(addresses, name))
        actor.bind()  # before any worker starts, so their first messages find it
        self._actor = actor
        self._actor_task = loop.create_task(actor.run(), name="supervisor-mailbox")
        self._actor_task.add_done_callback(self._mailbox_stopped)
        self._all_ready = loop.create_future()
        try:
            if self.config.nnodes > 1:
                await self._open_to_nodes(head_endpoint(self.config), addresses)
            if self.kind == "processes":
                self._spawn_processes(addresses)
            else:
                await self._spawn_threads(addresses)
            self._watchdog_task = loop.create_task(self._watchdog(), name="supervisor-watchdog")
            await asyncio.wait_for(asyncio.shield(self._all_ready), options.startup_timeout)
        except asyncio.TimeoutError:
            reason = f"workers not ready within {options.startup_timeout:g}s ({self._not_ready()})"
            await self.shutdown()
            raise WorkerStartError(reason) from None
        except WorkerStartError:
            await self.shutdown()
            if self._failure is not None:
                # A worker thread's own exception (a ModelFolderError naming the file, say) reaches
                # the caller as raised, as it would have without the actors in between.
                raise self._failure from None
            raise
        except BaseException:  # cancellation
            await self.shutdown()
            raise
        assert self.model_info is not None
        return self.model_info

    def send(self, message: proto.AddRequest | proto.AbortRequests) -> None:
        """Send a message to the scheduler (never blocks)."""
        assert self._actor is not None
        self._actor.send("scheduler", message)

    async def shutdown(self) -> None:
        """Stop every worker (Shutdown, then SIGKILL after ``shutdown_timeout``) and free every
        resource. Idempotent; after it, no child process of this supervisor is left."""
        if self._closed:
            return
        self._closing = True
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop_workers("shutdown"))
        await self._stop_task
        if self._actor is not None:
            self._actor.stop()
        if self._actor_task is not None:
            await self._actor_task
        if self._context is not None:
            self._context.destroy(linger=0)
        if self._parent_pipe_write is not None:
            os.close(self._parent_pipe_write)
            self._parent_pipe_write = None
        if self._links is not None:
            await self._links.close()
        if self._bridge is not None:
            self._bridge.close()
        if self._runtime_dir is not None:
            self._runtime_dir.cleanup()
        self._closed = True

    # ---------------------------------------------------------------- workers

    def _worker_args(self, addresses: Addresses, parent_fd: int = -1) -> WorkerArgs:
        return WorkerArgs(
            config=self.config,
            addresses=addresses,
            parent_fd=parent_fd,
            heartbeat_interval=self.options.heartbeat_interval,
            log_level=self.options.log_level,
        )

    async def _spawn_threads(self, addresses: Addresses) -> None:
        assert self._context is not None
        args = self._worker_args(addresses)
        for name in WORKER_NAMES:
            # NOTE: imported before any worker loop heartbeats (see preload), off this loop so it
            # keeps answering (signals, status lines) meanwhile.
            await asyncio.to_thread(preload, name)
        for name in WORKER_NAMES:
            thread = ActorThread(build_actor(name, args, self._context))
            self.workers[name] = WorkerThread(name, thread)
            thread.start()
            logger.info("started %s (thread)", name)

    def _spawn_processes(self, addresses: Addresses) -> None:
        # The parent pipe: workers hold the read end, only this process the write end. When this
        # process dies for any reason the kernel closes the write end and every worker reads EOF.
        # os.pipe() descriptors are not inheritable, so other children never hold the write end.
        read_fd, self._parent_pipe_write = os.pipe()
        environment = worker_environment()
        rendezvous = distributed_environment(self.config, environment)
        try:
            for name in worker_names(self.config):
                if self._links is not None and role(name) == "executor" and node_of(self.config, rank_of(name)):
                    self.workers[name] = RemoteWorker(name, node_of(self.config, rank_of(name)), self._links)
                    continue
                args = worker_args(self._worker_args(addresses, read_fd), name)
                process_environment = environment
                if role(name) == "executor" and self.config.tensor_parallel_size > 1:
                    process_environment = environment | rendezvous | rank_environment(self.config, rank_of(name))
                process = spawn_worker(name, args, read_fd, process_environment)
                self.workers[name] = WorkerProcess(name, process)
                logger.info("started %s (pid %d)", name, process.pid)
        finally:
            os.close(read_fd)
        processes = [worker.process for worker in self.workers.values() if isinstance(worker, WorkerProcess)]
        weakref.finalize(self, kill_all, processes)

    async def _open_to_nodes(self, endpoint: HeadEndpoint, addresses: Addresses) -> None:
        """The head's side of ``--nnodes`` (:mod:`pied.multinode`): TCP ports forwarded to this
        machine's mailboxes, each remote rank's mailbox forwarded to its TCP port, the node links."""
        from pied.multinode import FRONTEND, LINK, MEMORY, SCHEDULER

        bridge = self._bridge = Bridge()
        for offset, address in ((FRONTEND, addresses.frontend), (MEMORY, addresses.memory), (SCHEDULER, addresses.scheduler)):
            bridge.forward(Endpoint(endpoint.listen(offset), bind=True), Endpoint(address, bind=False))
        for name in worker_names(self.config):
            if role(name) == "executor" and node_of(self.config, rank_of(name)):
                bridge.forward(
                    Endpoint(worker_address(addresses, name), bind=True),
                    Endpoint(endpoint.listen(endpoint.executor_offset(rank_of(name))), bind=True),
                )
        options = self.options
        self._links = HeadLinks(
            self._check_node, self._node_message, self._node_lost, options.heartbeat_interval, options.heartbeat_timeout
        )
        await self._links.start(endpoint.port + LINK)
        logger.info(
            "waiting for nodes 1..%d at %s:%d (ports %d..%d)",
            self.config.nnodes - 1,
            endpoint.host,
            endpoint.link_port,
            endpoint.port,
            endpoint.port + endpoint.executor_offset(self.config.tensor_parallel_size - 1),
        )

    def _check_node(self, hello: Hello) -> EngineConfig | str:
        config = self.config
        if not 0 < hello.node_rank < config.nnodes:
            return f"--node-rank {hello.node_rank} is not a node of --nnodes {config.nnodes} (1..{config.nnodes - 1})"
        if (hello.nnodes, hello.tensor_parallel_size) != (config.nnodes, config.tensor_parallel_size):
            return (
                f"the node has --nnodes {hello.nnodes} --tensor-parallel-size {hello.tensor_parallel_size}, the head "
                f"--nnodes {config.nnodes} --tensor-parallel-size {config.tensor_parallel_size}"
            )
        if self.dead or self._closing:
            return "the head is shutting down"
        return config

    def _node_message(self, node: int, message: LinkMessage) -> None:
        if isinstance(message, (Started, Exited)):
            worker = self.workers.get(message.worker)
            if not isinstance(worker, RemoteWorker) or worker.node != node:
                logger.warning("node %d reported %s, which is not one of its ranks", node, message.worker)
                return
            worker.reported_pid = message.pid
            if isinstance(message, Exited):
                worker.ended(message.status, message.description)

    def _node_lost(self, node: int, reason: str) -> None:
        for worker in self.workers.values():
            if isinstance(worker, RemoteWorker) and worker.node == node:
                worker.ended(EXIT_FAILED, f"lost its node's link to the head ({reason})")

    async def _watchdog(self) -> None:
        """Notice dead and hung workers. Polls rather than waits: a poll every tick costs one
        waitpid per worker and bounds the detection delay by the tick."""
        options = self.options
        tick = min(0.1, options.heartbeat_interval / 2)
        expected = time.monotonic() + tick
        while not self.dead and not self._closing:
            await asyncio.sleep(tick)
            now = time.monotonic()
            # NOTE: if this loop itself was blocked, heartbeats that arrived meanwhile are still
            # unread in the mailbox; silence is evidence only when this tick ran on time.
            loop_was_late = now - expected > options.heartbeat_interval
            expected = now + tick
            for worker in self.workers.values():
                if worker.poll() is not None:
                    self._die(f"the {worker.name} (pid {worker.pid}) {worker.describe_exit()}", worker)
                    break
                if loop_was_late or worker.last_heartbeat is None:
                    continue
                silence = now - worker.last_heartbeat
                limit = options.heartbeat_timeout if worker.ready else options.startup_heartbeat_timeout
                if silence > limit:
                    self._die(
                        f"the {worker.name} (pid {worker.pid}) sent no heartbeat for {silence:.1f}s "
                        "(hung or stopped)",
                        worker,
                        hung=True,
                    )
                    break

    def _die(self, reason: str, worker: Worker | None = None, hung: bool = False) -> None:
        if self.dead or self._closing:
            return
        self.dead = True
        self.dead_reason = reason
        logger.error("engine dead: %s", reason)
        if worker is not None:
            self._failure = worker.failure
            if hung:
                # A stopped or wedged worker cannot act on Shutdown.
                worker.kill()
        if self._all_ready is not None and not self._all_ready.done():
            self._all_ready.set_exception(WorkerStartError(reason))
        # NOTE: callers hear about it first; stopping the other workers can take seconds.
        try:
            self._on_dead(reason)
        finally:
            if self._stop_task is None:
                self._stop_task = asyncio.get_running_loop().create_task(self._stop_workers(reason))

    async def _stop_workers(self, reason: str) -> None:
        """Shutdown to each live worker, wait until ``shutdown_timeout``, kill what is left, reap.

        The memory manager stops last: it owns the host segments the executor maps, and it is where
        the executor's step spans go until the executor has stopped.
        """
        deadline = time.monotonic() + self.options.shutdown_timeout
        if self._links is not None:
            # Nodes first: their ranks stop as asked (and report it), and they exit non-zero when
            # the engine died.
            self._links.stop(1 if self.dead else 0, reason)
        for stage in STOP_STAGES:
            members = [worker for name, worker in self.workers.items() if role(name) in stage]
            await self._stop_stage(members, reason, deadline)

    async def _stop_stage(self, workers: list[Worker], reason: str, deadline: float) -> None:
        live = [worker for worker in workers if worker.poll() is None]
        mailbox_up = self._actor_task is not None and not self._actor_task.done()
        for worker in live:
            if worker.killed:
                continue
            if self.dead and self._silent(worker):
                # A dead engine with a stopped or wedged worker (a SIGSTOPped tensor-parallel rank,
                # whose peers' step deadline found it): it cannot act on Shutdown, and waiting for
                # it would spend the later stages' time, the memory manager's, on nothing.
                logger.warning("%s (pid %d) is silent; killing it", worker.name, worker.pid)
                worker.kill()
            elif mailbox_up:
                assert self._actor is not None
                self._actor.send(worker.name, proto.Shutdown(reason=reason))
            else:  # no socket left to ask politely
                worker.kill()
        while any(worker.poll() is None for worker in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for worker in live:
            if worker.poll() is None:
                logger.warning("%s (pid %d) did not stop in time; killing it", worker.name, worker.pid)
                worker.kill()
        for worker in live:
            # Reaped, so no zombie is left either; after SIGKILL this returns at once. A thread
            # whose loop is wedged never ends, nor may a silent node report: give up after a second.
            give_up = time.monotonic() + (float("inf") if isinstance(worker, WorkerProcess) else 1.0)
            while worker.poll() is None and time.monotonic() < give_up:
                await asyncio.sleep(0.01)

    def _not_ready(self) -> str:
        waiting = [
            f"{name} (node {worker.node} not connected)"
            if isinstance(worker, RemoteWorker) and worker.node not in worker.links.links
            else name
            for name, worker in self.workers.items()
            if worker.ready is None
        ]
        return "still waiting for " + ", ".join(waiting) if waiting else "all ready"

    # ---------------------------------------------------------------- mailbox handlers

    def _mailbox_stopped(self, task: asyncio.Task[int]) -> None:
        # Without its mailbox the supervisor is deaf (an on_output callback raised, say): that is
        # as fatal as a worker dying, and must not pass for a silent, healthy engine.
        if not self._closing:
            if task.cancelled():
                outcome = "cancelled"
            elif task.exception() is not None:
                outcome = repr(task.exception())
            else:
                outcome = f"status {task.result()}; see the log for its error"
            self._die(f"the supervisor's mailbox stopped ({outcome})")

    def _handle_ready(self, ready: proto.Ready) -> None:
        worker = self.workers.get(ready.worker)
        if worker is None:
            logger.warning("Ready from unknown worker %r", ready.worker)
            return
        worker.ready = ready
        worker.last_heartbeat = time.monotonic()
        logger.info("%s ready (pid %d)", ready.worker, ready.pid)
        if ready.worker == "scheduler":
            self.model_info = ready
        if all(w.ready is not None for w in self.workers.values()) and self._all_ready is not None:
            if not self._all_ready.done():
                self._all_ready.set_result(None)

    def _handle_heartbeat(self, heartbeat: proto.Heartbeat) -> None:
        worker = self.workers.get(heartbeat.worker)
        if worker is not None:
            worker.last_heartbeat = time.monotonic()

    def _handle_dead(self, message: proto.Dead) -> None:
        self._die(f"the {message.worker} failed: {message.reason}", self.workers.get(message.worker))
