"""``pied serve``: the daemon. Starts the engine, serves the OpenAI-compatible API, supervises.

Lifecycle:
- start: load the tokenizer and chat template, start the engine (worker processes, or a thread
  with ``--inproc``), listen, print one line ``pied: listening on http://HOST:PORT ...``, and tell
  systemd ``READY=1`` when run under it (sd_notify; ``WATCHDOG=1`` pings while the engine lives);
- SIGTERM drains: ``/health`` and new requests answer 503 while requests in flight finish (up to
  ``--drain-timeout``), then what is left is aborted and the server stops; exit status 0;
- SIGINT stops at once (requests in flight end with ``finish_reason: abort``); a second signal
  of either kind also stops at once;
- the engine dying fails every request in flight with an error, and the daemon exits 1 so that
  its service manager restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pied.cli import add_engine_args, engine_config_from_args
from pied.config import ConfigError, EngineConfig
from pied.engine_client import EngineClient

if TYPE_CHECKING:
    from pied.api.state import ServerState

logger = logging.getLogger("pied.serve")

DEFAULT_MAX_REQUEST_BODY_BYTES = 32 << 20  # token-id prompts of a long context are several MiB of JSON
DEATH_GRACE_SECONDS = 1.0  # after the engine dies, time for handlers to send their errors


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    chat_template: str | None = None
    max_queued_requests: int | None = None
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    drain_timeout: float = 30.0
    inproc: bool = False

    def validate(self) -> ServeOptions:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port}.")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ConfigError("--max-queued-requests must be at least 0.")
        if self.max_request_body_bytes < 1024:
            raise ConfigError("--max-request-body-bytes must be at least 1024.")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must be non-negative.")
        return self


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the OpenAI-compatible API (the daemon)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    server.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (except on /health and /metrics); default: $PIED_API_KEY",
    )
    server.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template (a file, or the template itself) to use instead of the model's",
    )
    server.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        metavar="N",
        help="answer 503 while N requests wait to be scheduled (default: no limit)",
    )
    server.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        metavar="BYTES",
        help="answer 413 to larger request bodies",
    )
    server.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may take to finish",
    )
    server.add_argument(
        "--inproc", action="store_true", help="run the engine on a thread of this process (debugging)"
    )
    add_engine_args(parser)
    parser.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = engine_config_from_args(args)
    options = ServeOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("PIED_API_KEY") or None,
        chat_template=args.chat_template,
        max_queued_requests=args.max_queued_requests,
        max_request_body_bytes=args.max_request_body_bytes,
        drain_timeout=args.drain_timeout,
        inproc=args.inproc,
    ).validate()
    return uvloop.run(serve(config, options))


# ---------------------------------------------------------------- systemd


class SystemdNotifier:
    """sd_notify(3) without libsystemd: datagrams to ``$NOTIFY_SOCKET`` (read once, at start)."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address  # abstract namespace
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval = int(watchdog_usec) / 2e6 if watchdog_usec.isdigit() and for_us else None

    def notify(self, message: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as error:
            logger.warning("sd_notify(%s) failed: %s", message, error)

    async def watchdog(self, engine: EngineClient) -> None:
        """Ping while the engine lives; a dead engine stops the pings, and systemd steps in."""
        if self.watchdog_interval is None or not self.address:
            return
        while not engine.dead:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)


# ---------------------------------------------------------------- the daemon


def make_engine(config: EngineConfig, inproc: bool) -> EngineClient:
    if not inproc:
        try:
            from pied.mp_client import ProcessEngineClient
        except ImportError:  # the process engine is optional in a partial checkout
            pass
        else:
            return ProcessEngineClient(config)
    from pied.inproc import InprocEngineClient

    return InprocEngineClient(config)


async def wait_engine_dead(engine: EngineClient) -> str:
    wait_dead = getattr(engine, "wait_dead", None)
    if wait_dead is not None:
        return await wait_dead()
    while not engine.dead:  # the thread engine has no event for it
        await asyncio.sleep(0.1)
    return "the engine thread failed"


def model_vocab_size(engine: EngineClient) -> int:
    info = getattr(engine, "model_info", None)
    return int(getattr(info, "vocab_size", 0) or 0)


async def serve(config: EngineConfig, options: ServeOptions) -> int:
    from aiohttp import web

    from pied.api.app import create_app
    from pied.api.state import ServerState
    from pied.chat_template import check_chat_template, load_chat_template
    from pied.tokenizer import Tokenizer

    loop = asyncio.get_running_loop()
    systemd = SystemdNotifier()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signals.put_nowait, signum)

    model_dir = config.resolved_model()
    systemd.notify("STATUS=Loading the tokenizer and starting the engine")
    chat_template = None
    if options.chat_template is not None:
        # Errors (no such file, invalid Jinja) are ValueErrors: the CLI reports them and exits 2.
        chat_template = load_chat_template(options.chat_template)
        check_chat_template(chat_template)
    tokenizer = await asyncio.to_thread(Tokenizer.from_folder, model_dir, chat_template)

    engine = make_engine(config, options.inproc)
    start = asyncio.ensure_future(engine.start())
    first_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait([start, first_signal], return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        await engine.shutdown()
        return 0
    first_signal.cancel()
    if start.exception() is not None:
        print(f"pied: the engine failed to start: {start.exception()}", file=sys.stderr)
        await engine.shutdown()
        return 1

    server = ServerState(
        engine=engine,
        tokenizer=tokenizer,
        model_name=config.served_model_name or config.model or "default",
        model_root=str(model_dir),
        max_model_len=engine.max_model_len,  # type: ignore[attr-defined]
        vocab_size=model_vocab_size(engine),
        max_logprobs=config.max_logprobs,
        max_queued_requests=options.max_queued_requests,
    )
    app = create_app(server, api_key=options.api_key, max_request_body_bytes=options.max_request_body_bytes)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # engine requests (a non-streaming request would otherwise run to the end for nobody).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    # A deep backlog: a burst of clients connecting at once must not wait for SYN retries.
    site = web.TCPSite(runner, options.host, options.port, backlog=4096)
    try:
        await site.start()
    except OSError as error:
        print(f"pied: cannot listen on {options.host}:{options.port}: {error}", file=sys.stderr)
        await runner.cleanup()
        await engine.shutdown()
        return 1
    host, port = runner.addresses[0][:2]
    engine_kind = "thread" if options.inproc or type(engine).__name__ == "InprocEngineClient" else "processes"
    print(
        f"pied: listening on http://{host}:{port} (model {server.model_name}, engine in {engine_kind})",
        flush=True,
    )
    systemd.notify(f"READY=1\nSTATUS=Serving {server.model_name} on {host}:{port}")
    watchdog = asyncio.ensure_future(systemd.watchdog(engine))
    death = asyncio.ensure_future(wait_engine_dead(engine))
    next_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait([death, next_signal], return_when=asyncio.FIRST_COMPLETED)

    server.draining = True
    exit_status = 0
    if death.done():
        exit_status = 1
        print(f"pied: the engine died: {death.result()}; exiting", file=sys.stderr, flush=True)
        systemd.notify(f"STOPPING=1\nSTATUS=The engine died: {death.result()}")
        await wait_idle(server, DEATH_GRACE_SECONDS, None)
    else:
        signum = next_signal.result()
        systemd.notify("STOPPING=1\nSTATUS=Draining")
        timeout = options.drain_timeout if signum == signal.SIGTERM else 0.0
        logger.info("%s: draining %d requests (up to %.0f s)", signum.name, server.num_in_flight, timeout)
        await wait_idle(server, timeout, signals)
    for task in (watchdog, death, next_signal):
        task.cancel()
    # Engine first: the requests still in flight end (abort) and their handlers answer; then the
    # HTTP server closes its connections.
    await engine.shutdown()
    await runner.cleanup()
    return exit_status


async def wait_idle(
    server: ServerState, timeout: float, signals: asyncio.Queue[signal.Signals] | None
) -> None:
    """Wait until no generation request is in flight, ``timeout`` passes, or another signal comes."""
    deadline = time.monotonic() + timeout
    while server.num_in_flight > 0 and time.monotonic() < deadline:
        if signals is not None and not signals.empty():
            return
        await asyncio.sleep(0.05)
