"""The API's server span: the root of a generation request's trace across pied's processes.

One span per ``POST /v1/chat/completions`` or ``POST /v1/completions`` (probes, scrapes and the
other endpoints are not traced), named ``POST <route>`` with the HTTP semantic-convention attributes
and ``gen_ai.operation.name``/``gen_ai.provider.name`` (``gen_ai.system`` before semantic conventions 1.37). An incoming W3C ``traceparent`` (and
``tracestate``) header makes it a child of the caller's span. The span is current while the
handler runs, so :class:`pied.api.generation.Generation` adds the GenAI request and response
attributes and sends its ``traceparent`` to the engine in ``AddRequest.trace_context``.

It covers the whole response, streamed ones included (an aiohttp handler returns once its stream
is written). Installed only when the tracer records (``create_app(tracer=...)``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from workers.tracing import parent_context

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# Route -> gen_ai.operation.name (the GenAI semantic conventions' well-known values).
GENERATION_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",
}
GEN_AI_PROVIDER = "pied"  # a self-hosted server names itself; the well-known values are vendors'


def server_span_attributes(request: web.Request, operation: str) -> dict[str, str | int]:
    url = request.url
    attributes: dict[str, str | int] = {
        "http.request.method": request.method,
        "http.route": request.path,
        "url.path": request.path,
        "url.scheme": request.scheme,
        "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": GEN_AI_PROVIDER,
    }
    if url.host:
        attributes["server.address"] = url.host
    if url.port is not None:
        attributes["server.port"] = url.port
    if request.remote:
        attributes["client.address"] = request.remote
    user_agent = request.headers.get("User-Agent")
    if user_agent:
        attributes["user_agent.original"] = user_agent
    if request.content_length is not None:
        attributes["http.request.body.size"] = request.content_length
    return attributes


def tracing_middleware(tracer: trace.Tracer) -> Middleware:
    """The middleware that opens each generation request's server span. Put it outermost, so the
    span sees the status of the response the error middleware makes of a failure."""

    @web.middleware
    async def trace_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        operation = GENERATION_OPERATIONS.get(request.path) if request.method == "POST" else None
        if operation is None:
            return await handler(request)
        headers = request.headers
        parent = parent_context(headers.get("traceparent", ""), headers.get("tracestate", ""))
        span = tracer.start_span(
            f"{request.method} {request.path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=server_span_attributes(request, operation),
        )
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            try:
                response = await handler(request)
            except asyncio.CancelledError:
                # aiohttp cancels the handler of a client that went away (handler_cancellation).
                span.set_attribute("error.type", "client_disconnected")
                span.set_status(Status(StatusCode.ERROR, "the client disconnected"))
                raise
            except Exception as error:
                span.record_exception(error)
                span.set_attribute("error.type", type(error).__qualname__)
                span.set_status(Status(StatusCode.ERROR, str(error)))
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                # Semantic conventions: a server span's 4xx is the client's error, not the server's.
                span.set_attribute("error.type", str(response.status))
                span.set_status(Status(StatusCode.ERROR))
            return response

    return trace_request
