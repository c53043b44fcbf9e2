"""OpenTelemetry in every pied process: one call sets it up (DESIGN.md "Tracing").

``setup_tracing(service_name, config)`` gives a process its tracer: spans exported over OTLP when an
endpoint is configured, and a no-op tracer otherwise (nothing is exported, no thread is started,
and starting a span costs a function call that returns a shared non-recording span).

Where spans go, read once at start:

- ``--otlp-endpoint URL`` (``EngineConfig.otlp_endpoint``), else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
  (the full signal URL), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL);
- the protocol: ``grpc://host:4317`` means gRPC (plaintext); otherwise
  ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the
  default, or ``grpc``). An http/protobuf URL without a path gets ``/v1/traces``; for gRPC an
  ``http://`` URL is plaintext and ``https://`` is TLS;
- ``OTEL_SDK_DISABLED=true`` turns it all off; the exporters read the other standard variables
  themselves (``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``, ``..._COMPRESSION``, certificates),
  ``OTEL_BSP_*`` tune the batching, and ``OTEL_RESOURCE_ATTRIBUTES`` adds resource attributes.

Sampling: a span whose parent came from another process follows the parent's decision (the W3C
sampled flag), so a trace is whole or absent; a root span (a request without ``traceparent``) is
sampled by ``OTEL_TRACES_SAMPLER`` (``always_on``, the default, ``always_off`` or ``traceidratio``
with ``OTEL_TRACES_SAMPLER_ARG``; the ``parentbased_`` forms mean the same here).

One request is one trace: the API's server span travels as a W3C ``traceparent`` in
``AddRequest.trace_context`` (:func:`traceparent`, :func:`parent_context`), and the workers parent
their spans on it. Those spans are built after the fact, from timestamps recorded on the hot path,
with ``start_time``/``end_time``.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import workers
from proto.config import ConfigError, EngineConfig

logger = logging.getLogger(__name__)

__all__ = [
    "FRONTEND_SERVICE",
    "SCHEDULER_SERVICE",
    "EXECUTOR_SERVICE",
    "MEMORY_SERVICE",
    "OtlpTarget",
    "PresetSpanIds",
    "otlp_target",
    "parent_context",
    "process_resource",
    "sampled_parent",
    "setup_tracing",
    "shutdown_tracing",
    "traceparent",
    "tracing_enabled",
]

FRONTEND_SERVICE = "pied"
SCHEDULER_SERVICE = "pied-scheduler"
EXECUTOR_SERVICE = "pied-executor"
MEMORY_SERVICE = "pied-memory"

HTTP_PROTOBUF = "http/protobuf"
GRPC = "grpc"
TRACES_PATH = "/v1/traces"
SHUTDOWN_TIMEOUT = 5.0  # seconds a process waits at exit for its last spans to leave

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_OP_TRACER = trace.NoOpTracer()


@dataclass(frozen=True)
class OtlpTarget:
    """Where a process exports its spans: ``endpoint`` as its exporter takes it (the full
    ``.../v1/traces`` URL for http/protobuf; ``http://`` or ``https://`` host and port for gRPC)."""

    endpoint: str
    protocol: str  # HTTP_PROTOBUF or GRPC


def otlp_target(endpoint: str | None, environ: Mapping[str, str] = os.environ) -> OtlpTarget | None:
    """The OTLP target from ``--otlp-endpoint`` and the standard variables; None: export nothing.
    Raises ConfigError for an endpoint or protocol that cannot work."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    signal_url = False  # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the signal's own URL, used as is
    base_url = False  # OTEL_EXPORTER_OTLP_ENDPOINT is a base: the signal's path always goes after it
    if not endpoint:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        signal_url = bool(endpoint)
    if not endpoint:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        base_url = bool(endpoint)
    if not endpoint:
        return None
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parts = urlsplit(endpoint)
    scheme = parts.scheme.lower()
    if not parts.hostname:
        raise ConfigError(f"--otlp-endpoint {endpoint!r} names no host; give one like http://localhost:4318.")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ConfigError(f"--otlp-endpoint {endpoint!r}: the port must be in 1-65535.") from None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = (protocol or HTTP_PROTOBUF).strip().lower()
    if scheme == "grpc":
        protocol, scheme = GRPC, "http"
    if protocol == "http/json":
        raise ConfigError(
            "OTLP over http/json is not supported by OpenTelemetry's Python exporter; use http/protobuf or grpc."
        )
    if protocol not in (HTTP_PROTOBUF, GRPC):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf or grpc, got {protocol!r}.")
    if scheme not in ("http", "https"):
        raise ConfigError(f"--otlp-endpoint {endpoint!r}: use an http://, https:// or grpc:// URL.")
    if protocol == GRPC:
        return OtlpTarget(urlunsplit((scheme, parts.netloc, "", "", "")), GRPC)
    path = parts.path
    # --otlp-endpoint: a URL without a path is the collector's, and gets /v1/traces; one with a
    # path is the traces URL, as given (as vLLM's --otlp-traces-endpoint is used).
    if (base_url and not path.rstrip("/").endswith(TRACES_PATH)) or (not signal_url and path.strip("/") == ""):
        path = path.rstrip("/") + TRACES_PATH
    return OtlpTarget(urlunsplit((scheme, parts.netloc, path, parts.query, "")), HTTP_PROTOBUF)


def otlp_exporter(target: OtlpTarget) -> SpanExporter:
    # Imported here: a process without an endpoint never loads requests or grpc.
    if target.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=target.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=target.endpoint)


def root_sampler(environ: Mapping[str, str] = os.environ) -> Sampler:
    """Whether a trace that starts in pied is recorded, from ``OTEL_TRACES_SAMPLER``."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower().removeprefix("parentbased_")
    if name in ("", "always_on"):
        return ALWAYS_ON
    if name == "always_off":
        return ALWAYS_OFF
    if name == "traceidratio":
        argument = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            return TraceIdRatioBased(float(argument))
        except ValueError:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG must be a ratio in [0, 1], got {argument!r}."
            ) from None
    raise ConfigError(
        f"OTEL_TRACES_SAMPLER {name!r} is not supported; use always_on, always_off or traceidratio."
    )


def process_resource(service_name: str) -> Resource:
    """This process as OpenTelemetry sees it: ``OTEL_RESOURCE_ATTRIBUTES`` plus pied's own
    (the service name always pied's, so the processes of one engine stay apart)."""
    return Resource.create(
        {
            "service.name": service_name,
            "service.namespace": "pied",
            "service.version": workers.__version__,
            "process.pid": os.getpid(),
        }
    )


def setup_tracing(
    service_name: str,
    config: EngineConfig,
    *,
    id_generator: IdGenerator | None = None,
    environ: Mapping[str, str] = os.environ,
) -> trace.Tracer:
    """This process's tracer: exporting over OTLP (a BatchSpanProcessor, its own thread) when an
    endpoint is configured, else a no-op tracer. Call once per process (per actor in tests);
    finish with :func:`shutdown_tracing`, which also runs at interpreter exit."""
    target = otlp_target(config.otlp_endpoint, environ)
    if target is None:
        return _NO_OP_TRACER
    provider = sdk_trace.TracerProvider(
        sampler=ParentBased(root_sampler(environ)),
        resource=process_resource(service_name),
        id_generator=id_generator,
        # Our own bounded shutdown instead (shutdown_tracing): the SDK's waits up to 30 s.
        shutdown_on_exit=False,
    )
    provider.add_span_processor(BatchSpanProcessor(otlp_exporter(target)))
    tracer = provider.get_tracer("pied", workers.__version__)
    logger.info("%s: exporting spans over OTLP (%s) to %s", service_name, target.protocol, target.endpoint)
    atexit.register(shutdown_tracing, tracer)
    return tracer


def tracing_enabled(tracer: trace.Tracer) -> bool:
    """True when spans started on ``tracer`` go somewhere (callers skip their bookkeeping otherwise)."""
    return isinstance(tracer, sdk_trace.Tracer)


def shutdown_tracing(tracer: trace.Tracer, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
    """Export what is queued and stop the exporter threads, within ``timeout`` seconds (an
    unreachable collector must not hold up a worker's exit). False if it ran out of time.
    Idempotent; a no-op tracer has nothing to do."""
    if not isinstance(tracer, sdk_trace.Tracer):
        return True
    # The tracer holds its provider's processors; shutting them down is all the provider would do.
    done = threading.Thread(target=tracer.span_processor.shutdown, name="pied-tracing-shutdown", daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
        logger.warning("spans not exported within %.1f s at shutdown; dropping them", timeout)
        return False
    return True


# ---------------------------------------------------------------- W3C trace context


def traceparent(span_context: SpanContext) -> str:
    """The W3C ``traceparent`` of a span ("" for an invalid one)."""
    if not span_context.is_valid:
        return ""
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def parent_context(value: str, tracestate: str = "") -> Context | None:
    """An OpenTelemetry context whose current span is the remote parent named by a ``traceparent``
    (and ``tracestate``); None when ``value`` is empty or malformed."""
    if not value:
        return None
    carrier = {"traceparent": value, "tracestate": tracestate} if tracestate else {"traceparent": value}
    context = _PROPAGATOR.extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def sampled_parent(value: str) -> Context | None:
    """:func:`parent_context` of a sampled parent only: what a worker checks before it records
    anything for a request (an unsampled trace is recorded nowhere)."""
    context = parent_context(value)
    if context is None or not trace.get_current_span(context).get_span_context().trace_flags.sampled:
        return None
    return context


class PresetSpanIds(RandomIdGenerator):
    """Span ids handed out before their span exists.

    A span built after the fact (from timestamps) gets its id when it is built, but its children
    in another process may have to name it earlier: the scheduler sends the executor a request's
    ``prefill`` span as the parent of its prompt's forward passes when the prefill starts, and
    builds that span when the first token arrives. :meth:`reserve` picks the id, :meth:`use_next`
    makes the next span built take it.

    NOTE: not thread-safe: :meth:`use_next` and the ``start_span`` that consumes it must run on
    the same thread with no other span started in between (the scheduler's loop builds them
    back to back).
    """

    def __init__(self) -> None:
        self._next_span_id = 0

    @staticmethod
    def reserve() -> int:
        span_id = 0
        while span_id == trace.INVALID_SPAN_ID:
            span_id = random.getrandbits(64)
        return span_id

    def use_next(self, span_id: int) -> None:
        self._next_span_id = span_id

    def generate_span_id(self) -> int:
        span_id, self._next_span_id = self._next_span_id, 0
        return span_id or super().generate_span_id()
