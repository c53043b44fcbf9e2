"""The aiohttp application: routes, the error/auth middlewares, request ids, and the small endpoints.

Every response, errors included, is JSON in OpenAI's shape (``/metrics`` aside) and carries
``X-Request-Id``: the client's own when it sent one, a fresh one otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from opentelemetry import trace

import pied
from pied.api import openapi
from pied.api.body import read_json
from pied.api.chat import create_chat_completion, render_chat
from pied.api.completions import create_completion
from pied.api.connections import ConnectionLimit
from pied.api.errors import APIError, bad_request
from pied.api.openapi import Route
from pied.api.params import check_token_ids
from pied.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from pied.api.responses_api import ResponsesRequest, create_response
from pied.api.state import THREAD_DECODE_TOKENS, ServerState
from pied.api.tracing import tracing_middleware
from pied.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from workers.tracing import tracing_enabled

logger = logging.getLogger(__name__)

STATE = web.AppKey("state", ServerState)
OPENAPI = web.AppKey("openapi", bytes)
REQUEST_ID_HEADER = "X-Request-Id"
# Reachable without the API key (probes, scrapers, version checks; vLLM guards only /v1).
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})
# Paths whose requests count against --max-admitted-requests (they hold a body, the tokenizer or
# the engine); the cheap GETs, /health among them, are always answered.
ADMITTED_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"}
)
MAX_REQUEST_ID_LENGTH = 128

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(payload: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


# ---------------------------------------------------------------- middlewares


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into an OpenAI-shaped error body with the right status."""
    try:
        return await handler(request)
    except APIError as error:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return error.response(headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        if isinstance(error, web.HTTPNotFound):
            message = f"Not found: {request.path}"
        elif isinstance(error, web.HTTPMethodNotAllowed):
            message = f"Method {request.method} is not allowed for {request.path}."
        else:
            message = error.text or error.reason
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return APIError(error.status, message).response(headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # noqa: BLE001 - a bug in one request must not kill the server
        # The details go to the log only: an exception's text may carry paths, ids or data.
        logger.exception("error answering %s %s", request.method, request.path)
        return APIError(500, "Internal server error; the server's log has the details.").response()


def auth_middleware(api_key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = api_key.encode()

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            # aiohttp keeps bytes that are not UTF-8 as surrogates: encode them back the same way,
            # so such a header is a wrong key (401), not an encoding error (500).
            given = token.strip().encode("utf-8", "surrogateescape")
            # compare_digest: the comparison takes the same time however much of the key matches.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
                raise APIError(401, "Invalid or missing API key; send 'Authorization: Bearer <key>'.")
        return await handler(request)

    return check_api_key


def admission_middleware(
    server: ServerState,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The bound on requests admitted (``ServerState.admitted``), for the paths that cost the
    engine or the tokenizer; taken before the handler reads the body."""

    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.path not in ADMITTED_PATHS:
            return await handler(request)
        with server.admitted():
            return await handler(request)

    return admit


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.headers.get(REQUEST_ID_HEADER, "")
    # Echoed only when it is a plain token: a header that is not ASCII (or holds control
    # characters) would fail the response when it is written.
    if not (
        0 < len(request_id) <= MAX_REQUEST_ID_LENGTH and request_id.isascii() and request_id.isprintable()
    ):
        request_id = uuid.uuid4().hex
    response.headers[REQUEST_ID_HEADER] = request_id


# ---------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.Response:
    request.app[STATE].check_available()
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return json_response(VersionResponse(pied.__version__))


def model_card(server: ServerState, name: str | None = None) -> ModelCard:
    return ModelCard(name or server.model_name, server.created, server.model_root, server.max_model_len)


async def list_models(request: web.Request) -> web.Response:
    server = request.app[STATE]
    return json_response(ModelList([model_card(server, name) for name in server.served_model_names]))


async def get_model(request: web.Request) -> web.Response:
    server = request.app[STATE]
    name = request.match_info["model"]
    server.check_model(name)
    return json_response(model_card(server, name))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await create_chat_completion(request, request.app[STATE])


async def create_responses(request: web.Request) -> web.StreamResponse:
    return await create_response(request, request.app[STATE])


async def completions(request: web.Request) -> web.StreamResponse:
    return await create_completion(request, request.app[STATE])


async def tokenize(request: web.Request) -> web.Response:
    server = request.app[STATE]
    body = await read_json(request, server, TokenizeRequest)
    server.check_model(body.model)
    if body.messages is not None:
        prompt = await render_chat(
            server,
            body.messages,
            add_generation_prompt=body.add_generation_prompt is not False,
            continue_final_message=bool(body.continue_final_message),
            tools=body.tools,
            template_kwargs=body.chat_template_kwargs,
        )
        add_special_tokens = bool(body.add_special_tokens)
        param = "messages"
    elif body.prompt is not None:
        prompt = body.prompt
        add_special_tokens = body.add_special_tokens is not False
        param = "prompt"
    else:
        raise bad_request("Give either prompt or messages.", "prompt")
    token_ids = await server.encode(prompt, add_special_tokens, param)
    token_strs = None
    if body.return_token_strs:
        if len(token_ids) < THREAD_DECODE_TOKENS:
            token_strs = server.tokenizer.convert_ids_to_tokens(token_ids)
        else:
            token_strs = await asyncio.to_thread(server.tokenizer.convert_ids_to_tokens, token_ids)
    return json_response(TokenizeResponse(len(token_ids), server.max_model_len, token_ids, token_strs))


async def detokenize(request: web.Request) -> web.Response:
    server = request.app[STATE]
    body = await read_json(request, server, DetokenizeRequest)
    server.check_model(body.model)
    check_token_ids(body.tokens, server.vocab_size, "tokens")
    text = await server.decode(body.tokens, skip_special_tokens=False)
    return json_response(DetokenizeResponse(text))


async def metrics(request: web.Request) -> web.Response:
    server = request.app[STATE]
    text = server.metrics.render(server.engine.stats(), server.engine.worker_pids)
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


ROUTES = [
    Route("POST", "/v1/chat/completions", chat_completions, "Create a chat completion (streamed with SSE or not).",
          ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk),
    Route("POST", "/v1/completions", completions, "Create a text completion (streamed with SSE or not).",
          CompletionRequest, CompletionResponse, CompletionChunk),
    Route("POST", "/v1/responses", create_responses,
          "Create a model response (OpenAI's Responses API, text input and output; streamed with SSE or not).",
          ResponsesRequest),
    Route("GET", "/v1/models", list_models, "List the served model.", response=ModelList),
    Route("GET", "/v1/models/{model}", get_model, "Describe the served model.", response=ModelCard),
    Route("POST", "/tokenize", tokenize, "Tokenize a prompt or a chat conversation.", TokenizeRequest,
          TokenizeResponse),
    Route("POST", "/detokenize", detokenize, "Turn token ids back into text.", DetokenizeRequest,
          DetokenizeResponse),
    Route("GET", "/health", health, "200 while serving; 503 while draining or once the engine is dead."),
    Route("GET", "/ping", health, "The same as /health (as vLLM answers it, for SageMaker-style probes)."),
    Route("POST", "/ping", health, "The same as /health."),
    Route("GET", "/version", version, "The server's version.", response=VersionResponse),
    Route("GET", "/metrics", metrics, "Prometheus metrics (text exposition format 0.0.4).",
          response_content_type="text/plain"),
    Route("GET", "/openapi.json", openapi_document, "This OpenAPI document."),
]  # fmt: skip


def create_app(
    server: ServerState,
    *,
    api_key: str | None = None,
    max_request_body_bytes: int = 1 << 24,
    tracer: trace.Tracer | None = None,
    connection_limit: ConnectionLimit | None = None,
) -> web.Application:
    """The API. ``tracer`` (``workers.tracing.setup_tracing``): when it records, every generation
    request gets a server span, the root of its trace across the engine's processes.
    ``connection_limit``: the cap the listening site applies (it learns here which connections
    have a request in progress)."""
    middlewares: list[Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]] = [error_middleware]
    if tracer is not None and tracing_enabled(tracer):
        middlewares.insert(0, tracing_middleware(tracer))  # outermost: it sees the final status
    if connection_limit is not None:
        middlewares.insert(0, connection_limit.track_requests)
    if api_key:
        middlewares.append(auth_middleware(api_key))
    middlewares.append(admission_middleware(server))  # after the key check: strangers take no place
    # client_max_size makes request.read() raise 413 past the limit, before buffering the rest.
    app = web.Application(middlewares=middlewares, client_max_size=max_request_body_bytes)
    app[STATE] = server
    app[OPENAPI] = openapi.build_document(ROUTES, secured=bool(api_key), open_paths=OPEN_PATHS)
    app.on_response_prepare.append(add_request_id)
    for route in ROUTES:
        if route.method == "GET":  # and HEAD, as Starlette (vLLM) answers it: probes use it
            app.router.add_get(route.path, route.handler, allow_head=True)
        else:
            app.router.add_route(route.method, route.path, route.handler)
    return app
