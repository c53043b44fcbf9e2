"""The OpenAPI 3.1 document served at ``/openapi.json``, built from the routes and their msgspec
Structs (msgspec writes JSON Schema 2020-12, which OpenAPI 3.1 uses as is)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

import pied
from pied.api.errors import ErrorResponse

REF_TEMPLATE = "#/components/schemas/{name}"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    request: type[msgspec.Struct] | None = None
    response: type[msgspec.Struct] | None = None
    stream_chunk: type[msgspec.Struct] | None = None  # set when the endpoint can stream SSE
    response_content_type: str = "application/json"


def _operation(route: Route, refs: dict[type, dict[str, Any]], secured: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": route.summary, "operationId": route.handler.__name__}
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    if parameters:
        operation["parameters"] = parameters
    if route.request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[route.request]}},
        }
    content: dict[str, Any] = {}
    if route.response is not None:
        content[route.response_content_type] = {"schema": refs[route.response]}
    elif route.response_content_type != "application/json":
        content[route.response_content_type] = {"schema": {"type": "string"}}
    if route.stream_chunk is not None:
        content["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "With stream=true: server-sent events `data: <chunk>` (each chunk a "
                f"{route.stream_chunk.__name__}), then `data: [DONE]`.",
            },
            "x-chunk-schema": refs[route.stream_chunk],
        }
    ok: dict[str, Any] = {"description": "OK"}
    if content:
        ok["content"] = content
    operation["responses"] = {
        "200": ok,
        "default": {
            "description": "An error, in OpenAI's shape.",
            "content": {"application/json": {"schema": refs[ErrorResponse]}},
        },
    }
    if secured:
        operation["security"] = [{"bearerAuth": []}]
    return operation


def build_document(routes: Sequence[Route], *, secured: bool, open_paths: Iterable[str] = ()) -> bytes:
    """The document as JSON bytes (built once per app)."""
    types: list[type] = [ErrorResponse]
    for route in routes:
        for struct in (route.request, route.response, route.stream_chunk):
            if struct is not None and struct not in types:
                types.append(struct)
    schemas, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    refs = dict(zip(types, schemas))
    open_set = set(open_paths)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(
            route, refs, secured and route.path not in open_set
        )
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "pied",
            "version": pied.__version__,
            "description": "OpenAI-compatible API of the pied LLM inference daemon.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return msgspec.json.encode(document)
