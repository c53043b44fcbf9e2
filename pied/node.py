"""``pied serve MODEL --nnodes N --node-rank K`` with K > 0: a node that runs only its executor ranks
(:mod:`pied.multinode`).

It checks its own flags and model folder like the head (exit 2 on an error), connects to the head's
node link (waiting up to ``--startup-timeout`` for the head), and takes the head's configuration:
engine settings given here that differ are ignored, with a warning naming them, and API settings
(``--host``, ``--port``, ``--api-key``, templates, limits) are accepted and ignored, as vLLM's
headless nodes do. It then starts ranks ``K * T/N .. (K + 1) * T/N - 1`` as worker processes,
their mailboxes in a private runtime directory, fed from the head's TCP ports by a
:class:`~pied.zmq_bridge.Bridge`; they report Ready and heartbeats to the head directly.

Supervision, on this side: a rank that exits is reported to the head (whose engine then dies), and
this node stops the others and exits 1; the head's ``Stop`` stops the ranks (exit with the status
the head gives: 0 after its requested shutdown, 1 after its engine died); a head that disappears
(its link closes or stays silent past the heartbeat timeout) stops the ranks and exits 1. The ranks
also exit on their own if this process dies (their parent pipe), so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import zmq

import proto
from pied.exit_status import EXIT_CONFIG_ERROR, EXIT_OK, EXIT_RUNTIME_FAILURE, run_time
from pied.multinode import (
    FRONTEND,
    LINK,
    MEMORY,
    SCHEDULER,
    HeadEndpoint,
    head_endpoint,
    ignored_settings,
    node_config,
    node_ranks,
)
from pied.node_link import Exited, Hello, Kill, Link, LinkClosed, Started, Stop, open_link
from pied.runtime_dir import RuntimeDir
from pied.supervisor import describe_exit, kill_all, rank_environment, spawn_worker, worker_environment
from pied.zmq_bridge import Bridge, Endpoint
from proto.config import ConfigError, EngineConfig
from workers.actor import Addresses, WorkerArgs
from workers.roster import executor_address, executor_name, rank_of

if TYPE_CHECKING:
    from pied.serve import ServeOptions

logger = logging.getLogger(__name__)

Workers = dict[str, "subprocess.Popen[bytes]"]


# The ``pied serve`` settings a node uses; the others are the API's, which runs on the head only.
NODE_SERVE_FIELDS = frozenset({"startup_timeout", "heartbeat_timeout"})


@dataclass
class NodeOptions:
    startup_timeout: float = 600.0  # how long to wait for the head to listen
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    log_level: str = "INFO"
    ignored_api_flags: list[str] = field(default_factory=list)


def run_node(config: EngineConfig, serve_options: ServeOptions) -> int:
    """The node's exit status (2: the head refused it, or its configuration cannot join the head's);
    its API flags are accepted and ignored (named in a warning)."""
    import uvloop

    from pied.serve import ServeOptions

    defaults = ServeOptions()
    api_flags = [
        "--" + item.name.replace("_", "-")
        for item in dataclasses.fields(ServeOptions)
        if item.name not in NODE_SERVE_FIELDS and getattr(serve_options, item.name) != getattr(defaults, item.name)
    ]
    options = NodeOptions(
        startup_timeout=serve_options.startup_timeout,
        heartbeat_interval=min(0.5, serve_options.heartbeat_timeout / 4),
        heartbeat_timeout=serve_options.heartbeat_timeout,
        ignored_api_flags=api_flags,
    )
    node = Node(config, options)
    with run_time():
        return uvloop.run(node.run())


class Node:
    def __init__(self, config: EngineConfig, options: NodeOptions) -> None:
        self.local_config = config
        self.options = options
        self.endpoint: HeadEndpoint = head_endpoint(config)
        self._parent_pipe_write = -1
        self.link: Link | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, signals.put_nowait, signum)
        local = self.local_config
        endpoint = self.endpoint
        hello = Hello(local.node_rank, local.nnodes, local.tensor_parallel_size)
        print(
            f"pied: node {local.node_rank} of {local.nnodes}: joining the head at {endpoint.host}:{endpoint.link_port}",
            flush=True,
        )
        try:
            link, head = await open_link(endpoint.host, endpoint.port + LINK, hello, self.options.startup_timeout)
        except ValueError as refusal:
            print(f"pied: the head refused node {local.node_rank}: {refusal}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        except (ConnectionError, asyncio.TimeoutError, LinkClosed) as error:
            print(f"pied: node {local.node_rank} could not join the head: {error}", file=sys.stderr)
            return EXIT_RUNTIME_FAILURE
        self.link = link
        try:
            config = node_config(head, local)
        except ConfigError as error:
            print(f"pied: node {local.node_rank} cannot join the head's engine: {error}", file=sys.stderr)
            link.close()
            return EXIT_CONFIG_ERROR
        ignored = ignored_settings(head, local) + self.options.ignored_api_flags
        if ignored:
            logger.warning("the head's settings rule; ignored here: %s", ", ".join(ignored))
        runtime = RuntimeDir()
        bridge = Bridge()
        try:
            return await self._serve(config, link, runtime, bridge, signals)
        finally:
            bridge.close()
            link.close()
            runtime.cleanup()

    async def _serve(
        self,
        config: EngineConfig,
        link: Link,
        runtime: RuntimeDir,
        bridge: Bridge,
        signals: asyncio.Queue[signal.Signals],
    ) -> int:
        endpoint = self.endpoint
        # The head's mailboxes over its TCP ports; this node's ranks' mailboxes in its runtime dir.
        addresses = Addresses(
            frontend=endpoint.address(FRONTEND),
            scheduler=endpoint.address(SCHEDULER),
            executor=runtime.socket("executor"),
            memory=endpoint.address(MEMORY),
        )
        ranks = node_ranks(config, config.node_rank)
        for rank in ranks:
            bridge.forward(
                Endpoint(endpoint.address(endpoint.executor_offset(rank)), bind=False),
                Endpoint(executor_address(addresses, rank), bind=False),
            )
        workers = self._spawn(config, addresses, ranks)
        outboxes = zmq.Context()
        try:
            status = await self._watch(link, workers, signals)
            await self._stop_workers(workers, addresses, outboxes, link)
        finally:
            outboxes.destroy(linger=0)
        return status

    def _spawn(self, config: EngineConfig, addresses: Addresses, ranks: range) -> Workers:
        read_fd, self._parent_pipe_write = os.pipe()
        environment = worker_environment()
        workers: Workers = {}
        try:
            for local_rank, rank in enumerate(ranks):
                name = executor_name(rank)
                args = WorkerArgs(
                    config=config,
                    addresses=addresses,
                    parent_fd=read_fd,
                    heartbeat_interval=self.options.heartbeat_interval,
                    log_level=self.options.log_level,
                    rank=rank,
                )
                process = spawn_worker(name, args, read_fd, environment | rank_environment(config, local_rank))
                workers[name] = process
                assert self.link is not None
                self.link.send(Started(name, process.pid))
                logger.info("started %s (pid %d)", name, process.pid)
        finally:
            os.close(read_fd)
        weakref.finalize(self, kill_all, list(workers.values()))
        return workers

    async def _watch(self, link: Link, workers: Workers, signals: asyncio.Queue[signal.Signals]) -> int:
        """Until the head stops this node, the head is gone, a rank exits, or a signal: the status."""
        options = self.options
        alive = asyncio.ensure_future(link.keep_alive(options.heartbeat_interval, options.heartbeat_timeout))
        receive = asyncio.ensure_future(link.receive())
        signal_wait = asyncio.ensure_future(signals.get())
        try:
            while True:
                done, _ = await asyncio.wait([alive, receive, signal_wait], timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
                for name, process in workers.items():
                    returncode = process.poll()
                    if returncode is not None:
                        description = describe_exit(returncode)
                        link.send(Exited(name, process.pid, returncode, description))
                        print(f"pied: {name} (pid {process.pid}) {description}; stopping this node", file=sys.stderr)
                        return EXIT_RUNTIME_FAILURE
                if alive in done:
                    print(f"pied: the head at {link.peer} sent nothing for {options.heartbeat_timeout:g} s; stopping", file=sys.stderr)
                    return EXIT_RUNTIME_FAILURE
                if signal_wait in done:
                    print(f"pied: {signal_wait.result().name}: stopping this node", file=sys.stderr)
                    return EXIT_OK
                if receive in done:
                    try:
                        message = receive.result()
                    except LinkClosed as error:
                        print(f"pied: the head is gone ({error}); stopping this node", file=sys.stderr)
                        return EXIT_RUNTIME_FAILURE
                    if isinstance(message, Stop):
                        logger.info("the head stops this node: %s", message.reason)
                        return message.status
                    if isinstance(message, Kill) and message.worker in workers:
                        logger.warning("the head kills %s (hung)", message.worker)
                        workers[message.worker].kill()
                    receive = asyncio.ensure_future(link.receive())
        finally:
            for task in (alive, receive, signal_wait):
                task.cancel()

    async def _stop_workers(self, workers: Workers, addresses: Addresses, context: zmq.Context, link: Link) -> None:
        """Shutdown to each rank still running, SIGKILL after the shutdown timeout; each exit reported."""
        for name, process in workers.items():
            if process.poll() is None:
                outbox = context.socket(zmq.PUSH)
                outbox.setsockopt(zmq.LINGER, 500)
                outbox.connect(executor_address(addresses, rank_of(name)))
                outbox.send(msgspec.msgpack.encode(proto.Shutdown(reason="the node stops")), zmq.NOBLOCK)
        deadline = time.monotonic() + self.options.shutdown_timeout
        while any(process.poll() is None for process in workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for name, process in workers.items():
            if process.poll() is None:
                logger.warning("%s (pid %d) did not stop in time; killing it", name, process.pid)
                process.kill()
            returncode = process.wait()
            link.send(Exited(name, process.pid, returncode, describe_exit(returncode)))
        os.close(self._parent_pipe_write)
        try:
            await asyncio.wait_for(link.writer.drain(), 1.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass

