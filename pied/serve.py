"""``pied serve``: the daemon. Starts the engine, serves the OpenAI-compatible API, supervises.

Lifecycle:
- start: load the tokenizer and chat template, start the engine (its actors as worker processes,
  or as threads of this process with ``--inproc``), listen, print one line ``pied: listening on
  http://HOST:PORT ...``, and tell systemd ``READY=1`` when run under it (:mod:`pied.sdnotify`;
  before that, ``STATUS=`` lines and ``EXTEND_TIMEOUT_USEC`` while the workers load; after it,
  ``WATCHDOG=1`` pings while every worker heartbeats);
- SIGTERM (and SIGHUP: the terminal of a foreground daemon closed) drains: ``/health`` and new
  requests answer 503 while requests in flight finish (up to ``--shutdown-timeout``), then what is
  left is aborted and the server stops; exit status 0;
- SIGINT stops at once (requests in flight end with ``finish_reason: abort``); a second signal
  of either kind also stops at once;
- the engine dying (a worker exits, fails or hangs) fails every request in flight with an error,
  and the daemon exits 1 so that its service manager restarts it (also when it happens while
  draining); a configuration error exits 2 before anything starts (not worth a restart): an
  address that cannot be listened on (``--host`` not resolvable or not this machine's, a port it
  may not bind) too; a port in use exits 1, before the model loads (it may come free).

Every flag is also a key of the ``--config`` TOML file (:mod:`pied.config_file`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import functools
import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pied import config_file
from pied.args import add_engine_args, check_vllm_args, engine_config_from_args
from pied.engine_client import EngineClient
from pied.exit_status import run_time
from pied.generation_config import GenerationDefaults, load_generation_defaults
from pied.preflight import preflight
from pied.sdnotify import Notifier
from proto.config import ConfigError, EngineConfig

if TYPE_CHECKING:
    from pied.api.params import RequestLimits
    from pied.api.state import ServerState
    from pied.engine import Engine

logger = logging.getLogger("pied.serve")

DEFAULT_MAX_REQUEST_BODY_BYTES = 32 << 20  # token-id prompts of a long context are several MiB of JSON
LINGERING_SECONDS = 2.0  # aiohttp's default is 10 s of reading a body nobody wants
DEATH_GRACE_SECONDS = 1.0  # after the engine dies, time for handlers to send their errors
LOAD_STATUS_INTERVAL = 5.0  # seconds between STATUS/EXTEND_TIMEOUT_USEC messages while loading
SERVE_STATUS_INTERVAL = 5.0  # seconds between STATUS lines while serving
# What stopping takes besides the drain: aborting, stopping the workers (SIGKILL after 10 s),
# closing connections (5 s). Asked of systemd on top of --shutdown-timeout at SIGTERM.
STOP_MARGIN_SECONDS = 20.0


@dataclass(frozen=True)
class Bound:
    """The values a numeric flag accepts, as its error message says them: ``at least 1``,
    ``positive``, ``in [0, 65535]``."""

    low: float
    high: float | None = None
    exclusive: bool = False  # ``low`` itself is refused
    words: str | None = None  # how the message says it, when not "at least LOW" / "in [LOW, HIGH]"

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.exclusive else value >= self.low
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.words is not None:
            return self.words
        if self.high is not None:
            return f"in [{self.low}, {self.high}]"
        return f"at least {self.low}"


POSITIVE = Bound(0, exclusive=True, words="positive")
NON_NEGATIVE = Bound(0, words="non-negative")


@dataclass(frozen=True)
class NumericFlag:
    """One numeric ``pied serve`` flag: its option, value type, accepted values and help. Its key
    (the ServeOptions field, and the ``--config`` key) is the option's name in snake case; its
    default is that field's, shown in the help as ``{default}``. None (no limit) is always accepted."""

    flag: str
    type: type[int] | type[float]
    bound: Bound
    help: str
    metavar: str = "N"
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def check(self, value: float | None) -> None:
        if value is not None and not self.bound.accepts(value):
            raise ConfigError(f"{self.flag} must be {self.bound}, got {value}.")

    def add_to(self, group: argparse._ArgumentGroup, defaults: ServeOptions) -> None:
        group.add_argument(
            self.flag,
            *self.aliases,
            dest=self.key,
            type=self.type,
            metavar=self.metavar,
            help=self.help.format(default=getattr(defaults, self.key)),
        )


# The server's numeric flags, in the order --help lists them.
SERVER_FLAGS = (
    NumericFlag(
        "--port", int, Bound(0, 65535), "port to listen on; 0 picks a free one (default: {default})", "PORT"
    ),
    NumericFlag(
        "--max-queued-requests",
        int,
        Bound(0),
        "answer 503 while N requests wait to be scheduled (default: no limit)",
    ),
    NumericFlag(
        "--max-request-body-bytes",
        int,
        Bound(1024),
        "answer 413 to larger request bodies (default: {default})",
        "BYTES",
    ),
    NumericFlag(
        "--max-admitted-requests",
        int,
        Bound(1),
        "answer 429 (with Retry-After) while N generation/tokenize requests are being answered, "
        "counted before their bodies are read (default: {default})",
    ),
    NumericFlag(
        "--max-connections",
        int,
        Bound(1),
        "the most open connections; past it an idle one is closed, else the new one gets a 503 "
        "(default: {default})",
    ),
    NumericFlag(
        "--keep-alive-timeout",
        float,
        POSITIVE,
        "close a connection whose next request's headers have not all arrived this long after it "
        "opened or after its last response (default: {default:g})",
        "SECONDS",
    ),
    NumericFlag(
        "--body-timeout",
        float,
        POSITIVE,
        "answer 408 to a request body that takes longer to arrive (default: {default:g})",
        "SECONDS",
    ),
    NumericFlag(
        "--write-timeout",
        float,
        POSITIVE,
        "cut a stream whose client reads nothing for this long, and abort its request (default: {default:g})",
        "SECONDS",
    ),
    NumericFlag(
        "--shutdown-timeout",
        float,
        NON_NEGATIVE,
        "on SIGTERM, how long requests in flight may take to finish before they are aborted "
        "(default: {default:g})",
        "SECONDS",
        aliases=("--drain-timeout",),
    ),
    NumericFlag(
        "--startup-timeout",
        float,
        POSITIVE,
        "how long the workers may take to load the model (default: {default:g})",
        "SECONDS",
    ),
    NumericFlag(
        "--heartbeat-timeout",
        float,
        Bound(1, words="at least 1 second"),
        "a worker silent this long counts as hung: the daemon exits non-zero (default: {default:g})",
        "SECONDS",
    ),
)

# What one request may ask for: pied.api.params.RequestLimits, field for field.
REQUEST_LIMIT_FLAGS = tuple(
    NumericFlag(flag, int, Bound(1), help)
    for flag, help in (
        ("--max-n", "the largest n (default: {default})"),
        ("--max-choices", "the most choices per request, n times its prompts (default: {default})"),
        (
            "--max-output-tokens",
            "the largest max_tokens, and the default for a request without one (default: the rest of the context)",
        ),
        ("--max-prompt-tokens", "the longest prompt, in tokens (default: the context)"),
        ("--max-prompts", "the most prompts in one /v1/completions request (default: {default})"),
        ("--max-messages", "the most messages in one chat request (default: {default})"),
        ("--max-stop-token-ids", "the most stop_token_ids per request (default: {default})"),
        ("--max-stop-strings", "the most stop strings per request (default: {default})"),
        ("--max-stop-string-chars", "the stop strings' total length in characters (default: {default})"),
    )
)

NUMERIC_FLAGS = SERVER_FLAGS + REQUEST_LIMIT_FLAGS


@dataclass
class ServeOptions:
    """``pied serve``'s own settings (the engine's are an EngineConfig), one field per flag."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_file: str | None = None
    chat_template: str | None = None
    max_queued_requests: int | None = None
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    # What one client can hold: admitted requests (429 past it), connections, and how long a
    # connection may sit on its headers (also the keep-alive), its body, or a stream it does not read.
    max_admitted_requests: int = 256
    max_connections: int = 512
    keep_alive_timeout: float = 5.0
    body_timeout: float = 30.0
    write_timeout: float = 30.0
    shutdown_timeout: float = 30.0
    startup_timeout: float = 600.0
    heartbeat_timeout: float = 10.0
    inproc: bool = False
    # Request limits (pied.api.params.RequestLimits).
    max_n: int = 128
    max_choices: int = 1024
    max_output_tokens: int | None = None
    max_prompt_tokens: int | None = None
    max_prompts: int = 256
    max_messages: int = 1024
    max_stop_strings: int = 32
    max_stop_string_chars: int = 1024
    max_stop_token_ids: int = 256
    # Tools and reasoning (vLLM's flags): parsers of the model's output text.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # vLLM's serving habits: the names the model answers to (the first is the one responses
    # carry), and where request defaults come from (pied.generation_config).
    served_model_name: list[str] | None = None
    generation_config: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        """The options given (flags or config file); built-in defaults for the rest."""
        given = {
            field.name: getattr(args, field.name)
            for field in dataclasses.fields(cls)
            if getattr(args, field.name, None) is not None
        }
        return cls(**given)

    def validate(self) -> ServeOptions:
        for row in NUMERIC_FLAGS:
            row.check(getattr(self, row.key))
        if self.served_model_name is not None:
            if not self.served_model_name or not all(name.strip() for name in self.served_model_name):
                raise ConfigError("--served-model-name needs non-empty names.")
        if not self.generation_config:
            raise ConfigError("--generation-config must be auto, vllm or a folder.")
        if self.api_key is not None and self.api_key_file is not None:
            raise ConfigError("give --api-key or --api-key-file, not both.")
        from pied.api.reasoning import REASONING_PARSERS
        from pied.api.tool_parsers import TOOL_PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ConfigError(
                f"--tool-call-parser must be one of {', '.join(TOOL_PARSERS)}, got {self.tool_call_parser!r}."
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser.")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError(
                f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}, got {self.reasoning_parser!r}."
            )
        return self

    def request_limits(self) -> RequestLimits:
        from pied.api.params import RequestLimits

        return RequestLimits(**{row.key: getattr(self, row.key) for row in REQUEST_LIMIT_FLAGS})

    def resolved_api_key(self) -> str | None:
        """``--api-key``, else the first line of ``--api-key-file``, else ``$PIED_API_KEY``."""
        if self.api_key:
            return self.api_key
        if self.api_key_file is not None:
            return read_api_key_file(self.api_key_file)
        return os.environ.get("PIED_API_KEY") or None


def read_api_key_file(path: str) -> str:
    try:
        key = Path(path).read_text().strip()
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ConfigError(f"--api-key-file {path}: {error.strerror}.") from None
    if not key or "\n" in key:
        raise ConfigError(f"--api-key-file {path} must hold the key alone, on one line.")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s can be read by other users; chmod 600 it (or 640 for the service's group)", path)
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- command line


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    # Every option defaults to None, so a --config file can fill what the command line left out;
    # the real defaults are ServeOptions' and EngineConfig's (shown in the help texts).
    defaults = ServeOptions()
    parser = subparsers.add_parser(
        "serve",
        help="serve the OpenAI-compatible API (the daemon)",
        description="Serve the OpenAI-compatible API. Every flag is also a key of the --config file.",
    )
    server = parser.add_argument_group("server")
    server.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a TOML file of settings, one key per flag (max-num-seqs = 64); flags given here win",
    )
    server.add_argument("--host", help=f"address to listen on (default: {defaults.host})")
    server.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' (except on /health and /metrics); "
        "default: --api-key-file, else $PIED_API_KEY",
    )
    server.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="read the API key from FILE (keeps it out of ps and the config)",
    )
    server.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="the names the model answers to in requests' model field and /v1/models; responses carry "
        "the first (default: the model id, or --model)",
    )
    server.add_argument(
        "--generation-config",
        metavar="auto|vllm|FOLDER",
        help="request defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) "
        "from the model folder's generation_config.json (auto), none (vllm), or FOLDER's "
        f"(default: {defaults.generation_config})",
    )
    server.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template (a file, or the template itself) to use instead of the model's",
    )
    for row in SERVER_FLAGS:
        row.add_to(server, defaults)
    server.add_argument(
        "--inproc",
        action="store_true",
        default=None,
        help="run the engine's workers as threads of this process instead of processes (debugging)",
    )
    limits = parser.add_argument_group("request limits (a request past one gets a 400)")
    for row in REQUEST_LIMIT_FLAGS:
        row.add_to(limits, defaults)
    tools = parser.add_argument_group("tools and reasoning")
    tools.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        default=None,
        help='parse tool calls out of the output for tool_choice "auto" (needs --tool-call-parser)',
    )
    tools.add_argument("--tool-call-parser", metavar="NAME", help="hermes, llama3_json or mistral")
    tools.add_argument(
        "--reasoning-parser", metavar="NAME", help="qwen3 or deepseek_r1: <think>...</think> into reasoning_content"
    )
    add_engine_args(parser)
    parser.set_defaults(handler=functools.partial(cmd_serve, parser=parser))


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import uvloop

    from workers.process_security import make_non_dumpable

    # Before the API key is read: no core dump or same-user ptrace of the daemon that holds it.
    make_non_dumpable()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The configuration phase: every error here is a ConfigError or ModelFolderError (exit 2),
    # raised before any worker starts.
    check_vllm_args(args)  # before the file: the positional MODEL counts as given on the command line
    from_file = config_file.apply(parser, args, args.config) if args.config is not None else set()
    try:
        options = ServeOptions.from_args(args).validate()
        config = preflight(engine_config_from_args(args))
        if options.inproc and config.tensor_parallel_size > 1:
            raise ConfigError(
                f"--tensor-parallel-size {config.tensor_parallel_size} runs one process per rank; drop --inproc."
            )
        generation_defaults = load_generation_defaults(options.generation_config, config.resolved_model())
    except ConfigError as error:  # a value the file set: name the file and its key
        raise config_file.blame(error, args.config, from_file) if from_file else error from None
    if config.node_rank > 0:  # a node of a multi-node engine: its executor ranks only, no API
        from pied.node import run_node

        return run_node(config, options)
    check_chat_template_option(options.chat_template)
    # The address before any worker: a typo in --host must not cost a model load (under systemd,
    # one per restart); a port in use is worth a restart (exit 1), still before the load.
    if not can_listen(options.host, options.port):
        return 1
    api_key = options.resolved_api_key()
    if api_key is None and not is_loopback(options.host):
        logger.warning("listening on %s without an API key: anyone who can reach it can use it", options.host)
    plan = config.plan
    assert plan is not None
    logger.info(
        "checked: model %s on %s in %s, max model length %d, device KV %s, host KV %d blocks",
        plan.model_path,
        plan.device,
        plan.dtype,
        plan.max_model_len,
        f"{plan.num_device_blocks} blocks" if plan.num_device_blocks is not None else "sized by the executor",
        plan.host.max_host_blocks,
    )
    with run_time():  # from here on a failure is exit 1, whatever its type
        return uvloop.run(serve(config, options, api_key, generation_defaults))


def check_chat_template_option(chat_template: str | None) -> None:
    """``--chat-template``: a file or a template that loads and compiles."""
    if chat_template is None:
        return
    from pied.chat_template import ChatTemplateError, check_chat_template, load_chat_template

    try:
        check_chat_template(load_chat_template(chat_template))
    except ChatTemplateError as error:
        raise ConfigError(f"--chat-template: {error}") from None


# ---------------------------------------------------------------- the daemon


def make_engine(config: EngineConfig, options: ServeOptions) -> Engine:
    """The engine's actors as worker processes, or with ``--inproc`` as threads of this process:
    the same code, handshake, heartbeats and failure handling either way."""
    from pied.engine import Engine, SupervisorOptions

    supervisor_options = SupervisorOptions(
        startup_timeout=options.startup_timeout,
        heartbeat_interval=min(0.5, options.heartbeat_timeout / 4),
        heartbeat_timeout=options.heartbeat_timeout,
        startup_heartbeat_timeout=max(60.0, options.heartbeat_timeout),
    )
    return Engine(config, supervisor_options, workers="threads" if options.inproc else "processes")


async def report_loading(engine: EngineClient, notifier: Notifier) -> None:
    """While the engine starts: where each worker is, and more time from systemd as long as the
    supervisor still waits (its own --startup-timeout and hang checks bound the load)."""
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        notifier.extend_timeout(
            3 * LOAD_STATUS_INTERVAL, f"Loading the model: {engine.startup_progress} ({elapsed:.0f} s)"
        )
        await asyncio.sleep(LOAD_STATUS_INTERVAL)


async def report_serving(server: ServerState, notifier: Notifier, where: str) -> None:
    while True:
        stats = server.engine.stats()
        notifier.status(
            f"Serving {server.model_name} on {where}: {stats.num_running} running, {stats.num_waiting} waiting, "
            f"KV cache {stats.device_usage:.0%} used"
        )
        await asyncio.sleep(SERVE_STATUS_INTERVAL)


async def start_engine(
    engine: EngineClient, notifier: Notifier, signals: asyncio.Queue[signal.Signals]
) -> int | None:
    """Start the engine; None once it is ready, else the exit status (a signal, a failed start)."""
    start = asyncio.ensure_future(engine.start())
    first_signal = asyncio.ensure_future(signals.get())
    loading = asyncio.ensure_future(report_loading(engine, notifier))
    try:
        await asyncio.wait([start, first_signal], return_when=asyncio.FIRST_COMPLETED)
    finally:
        loading.cancel()
    if not start.done():
        notifier.stopping(f"Stopped by {first_signal.result().name} while loading")
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        await engine.shutdown()
        return 0
    first_signal.cancel()
    error = start.exception()
    if error is not None:
        print(f"pied: the engine failed to start: {error}", file=sys.stderr)
        notifier.stopping(f"The engine failed to start: {error}")
        await engine.shutdown()
        return 1
    return None


def can_listen(host: str | None, port: int) -> bool:
    """Whether ``host``:``port`` can be listened on, found by binding it (as the server will, with
    SO_REUSEADDR) and letting go. A host that does not resolve or is not this machine's, or a port
    this user may not bind, is a ConfigError (exit 2); a port in use prints why and is False."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError(f"--host {host!r} cannot be resolved ({error.strerror}).") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds it
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    print(f"pied: cannot listen on {host}:{port}: {error.strerror}", file=sys.stderr)
                    return False
                if error.errno == errno.EACCES:
                    raise ConfigError(f"--port {port}: this user may not listen on it ({error.strerror}).") from None
                raise ConfigError(f"--host {host}: cannot listen on it ({error.strerror}).") from None
    return True


async def serve(
    config: EngineConfig,
    options: ServeOptions,
    api_key: str | None = None,
    generation_defaults: GenerationDefaults | None = None,
) -> int:
    from aiohttp import web

    from pied.api.app import create_app
    from pied.api.connections import ConnectionLimit, LimitedTCPSite
    from pied.api.state import ServerState
    from pied.chat_template import check_chat_template, load_chat_template
    from pied.tokenizer import Tokenizer
    from workers.model_config import ModelConfig
    from workers.tracing import FRONTEND_SERVICE, setup_tracing

    loop = asyncio.get_running_loop()
    notifier = Notifier()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, signals.put_nowait, signum)

    model_dir = config.resolved_model()
    if generation_defaults is None:
        generation_defaults = load_generation_defaults(options.generation_config, model_dir)
    if generation_defaults.values:
        # vLLM says so too: a request's defaults are not pied's own but the model's.
        logger.info("request defaults from %s: %s", generation_defaults.source, generation_defaults.values)
    # Before any worker starts: an unsupported or quantized model folder is a configuration error (exit 2).
    ModelConfig.from_folder(model_dir)
    tracer = setup_tracing(FRONTEND_SERVICE, config)  # before the workers: a bad --otlp-endpoint stops here
    notifier.status(f"Loading the tokenizer of {model_dir}")
    chat_template = None
    if options.chat_template is not None:
        # Errors (no such file, invalid Jinja) are ValueErrors: the CLI reports them and exits 2.
        chat_template = load_chat_template(options.chat_template)
        check_chat_template(chat_template)
    tokenizer = await asyncio.to_thread(Tokenizer.from_folder, model_dir, chat_template)

    engine = make_engine(config, options)
    failed = await start_engine(engine, notifier, signals)
    if failed is not None:
        return failed

    server = ServerState(
        engine=engine,
        tokenizer=tokenizer,
        served_model_names=tuple(
            options.served_model_name or [config.served_model_name or config.model or "default"]
        ),
        generation_defaults=generation_defaults,
        model_root=str(model_dir),
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        max_logprobs=config.max_logprobs,
        max_queued_requests=options.max_queued_requests,
        max_admitted_requests=options.max_admitted_requests,
        body_timeout=options.body_timeout,
        write_timeout=options.write_timeout,
        limits=options.request_limits(),
        enable_auto_tool_choice=options.enable_auto_tool_choice,
        tool_call_parser=options.tool_call_parser,
        reasoning_parser=options.reasoning_parser,
    )
    connection_limit = ConnectionLimit(options.max_connections)
    app = create_app(
        server,
        api_key=api_key,
        max_request_body_bytes=options.max_request_body_bytes,
        tracer=tracer,
        connection_limit=connection_limit,
    )
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # engine requests (a non-streaming request would otherwise run to the end for nobody).
    # keepalive_timeout is also the header deadline (pied.api.connections); lingering_time bounds
    # how long an unread body is drained after an early answer (401, 413, 408).
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=5.0,
        keepalive_timeout=options.keep_alive_timeout,
        lingering_time=LINGERING_SECONDS,
    )
    await runner.setup()
    # A deep backlog: a burst of clients connecting at once must not wait for SYN retries.
    site = LimitedTCPSite(runner, options.host, options.port, connection_limit, backlog=4096)
    try:
        await site.start()
    except OSError as error:
        print(f"pied: cannot listen on {options.host}:{options.port}: {error}", file=sys.stderr)
        notifier.stopping(f"Cannot listen on {options.host}:{options.port}")
        await runner.cleanup()
        await engine.shutdown()
        return 1
    host, port = runner.addresses[0][:2]
    print(
        f"pied: listening on http://{host}:{port} (model {server.model_name}, workers as {engine.workers})",
        flush=True,
    )
    notifier.ready(f"Serving {server.model_name} on {host}:{port}")
    background = [
        asyncio.ensure_future(notifier.run_watchdog(lambda: engine.healthy)),
        asyncio.ensure_future(report_serving(server, notifier, f"{host}:{port}")),
    ]
    death = asyncio.ensure_future(engine.wait_dead())
    next_signal = asyncio.ensure_future(signals.get())
    await asyncio.wait([death, next_signal], return_when=asyncio.FIRST_COMPLETED)

    server.draining = True
    for task in background:
        task.cancel()
    if death.done():
        print(f"pied: the engine died: {death.result()}; exiting", file=sys.stderr, flush=True)
        notifier.stopping(f"The engine died: {death.result()}")
        await wait_idle(server, DEATH_GRACE_SECONDS, None, notifier)
    else:
        signum = next_signal.result()
        timeout = options.shutdown_timeout if signum in (signal.SIGTERM, signal.SIGHUP) else 0.0
        logger.info("%s: draining %d requests (up to %g s)", signum.name, server.num_in_flight, timeout)
        notifier.stopping(f"Draining {server.num_in_flight} requests")
        notifier.extend_timeout(timeout + STOP_MARGIN_SECONDS)
        await wait_idle(server, timeout, signals, notifier)
    death.cancel()
    next_signal.cancel()
    # Engine first: the requests still in flight end (abort) and their handlers answer; then the
    # HTTP server closes its connections.
    await engine.shutdown()
    await runner.cleanup()
    # A worker that died at any point, drain included, is a failure the service manager must see.
    if engine.dead:
        print(f"pied: exiting with status 1: {engine.dead_reason}", file=sys.stderr)
        return 1
    return 0


async def wait_idle(
    server: ServerState,
    timeout: float,
    signals: asyncio.Queue[signal.Signals] | None,
    notifier: Notifier,
) -> None:
    """Wait until no generation request is in flight, ``timeout`` passes, another signal comes or
    (while draining) the engine dies."""
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + 1.0
    while server.num_in_flight > 0 and time.monotonic() < deadline:
        if signals is not None and (not signals.empty() or server.engine.dead):
            return
        if time.monotonic() >= next_status:
            left = deadline - time.monotonic()
            notifier.status(f"Draining: {server.num_in_flight} requests in flight, {left:.0f} s left")
            next_status += 1.0
        await asyncio.sleep(0.05)
