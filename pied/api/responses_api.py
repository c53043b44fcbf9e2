"""``POST /v1/responses``: OpenAI's Responses API for text input and output, as an adapter over
chat completions (the same checks, chat template, sampling and engine requests).

The input is a string (one user message) or a list of messages (``role`` and ``content``, a string
or ``input_text``/``output_text`` parts), with ``instructions`` as a leading system message. The
output is one ``message`` item holding one ``output_text`` part. Streamed, the events are OpenAI's:
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` per piece of text,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done`` and
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut it short), each
with its ``sequence_number``; an engine failure after the stream started is an ``error`` event.

Nothing is stored: ``store: true`` (OpenAI's default) is answered with ``store: false``, as vLLM
answers it without its store; ``previous_response_id`` and retrieving a response are not
available; tools, reasoning and non-text formats answer 400 naming the field.
"""

from __future__ import annotations

import re
import time
from typing import Any, Union

import msgspec
from aiohttp import web

from pied.api import responses, sse
from pied.api.body import read_json
from pied.api.chat import prepare_chat
from pied.api.chat_output import ChatOutputStream
from pied.api.errors import APIError, bad_request
from pied.api.generation import Generation
from pied.api.protocol import ChatCompletionRequest
from pied.api.state import ServerState
from pied.engine_client import EngineDeadError

# Fields of OpenAI's request that pied does not implement: a 400 naming them when set.
UNSUPPORTED = ("tools", "tool_choice", "previous_response_id", "conversation", "reasoning", "include",
               "background", "prompt", "top_logprobs")  # fmt: skip
# The chat request's parameter names, as this endpoint calls them (for the 400s chat raises).
PARAM_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens"}
_UNKNOWN_FIELD = re.compile(r"unknown field `(?P<field>[^`]+)`")


class InputPart(msgspec.Struct, kw_only=True):
    type: str
    text: Union[str, None] = None


class InputMessage(msgspec.Struct, kw_only=True):
    role: str
    content: Union[str, list[InputPart]]
    type: Union[str, None] = None  # "message" when given


class TextFormat(msgspec.Struct, kw_only=True):
    type: str = "text"


class TextOptions(msgspec.Struct, kw_only=True):
    format: TextFormat = msgspec.field(default_factory=TextFormat)


class ResponsesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Union[str, None] = None
    input: Union[str, list[InputMessage]]
    instructions: Union[str, None] = None
    max_output_tokens: Union[int, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    stream: Union[bool, None] = False
    store: Union[bool, None] = None
    metadata: Union[dict[str, str], None] = None
    user: Union[str, None] = None
    parallel_tool_calls: Union[bool, None] = None
    truncation: Union[str, None] = None
    text: Union[TextOptions, None] = None
    service_tier: Union[str, None] = None
    tools: Any = None
    tool_choice: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    reasoning: Any = None
    include: Any = None
    background: Any = None
    prompt: Any = None
    top_logprobs: Any = None


def check_request(body: ResponsesRequest) -> None:
    for name in UNSUPPORTED:
        value = getattr(body, name)
        if value is not None and value != [] and value is not False:
            raise bad_request(
                f"{name} is not supported by pied's /v1/responses (text input and output only).", name
            )
    if body.text is not None and body.text.format.type != "text":
        raise bad_request(
            f"text.format type {body.text.format.type!r} is not supported; only text is.", "text.format"
        )
    if body.truncation not in (None, "disabled"):
        raise bad_request(f"truncation {body.truncation!r} is not supported; only disabled is.", "truncation")


def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages: instructions first (as the system message), then input."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    for i, item in enumerate(body.input):
        if item.type not in (None, "message"):
            raise bad_request(
                f"Input items of type {item.type!r} are not supported; only messages are.", f"input[{i}].type"
            )
        if item.role not in ("user", "system", "developer", "assistant"):
            raise bad_request(f"Unknown role {item.role!r}.", f"input[{i}].role")
        content = item.content
        if not isinstance(content, str):
            texts = []
            for j, part in enumerate(content):
                if part.type not in ("input_text", "output_text", "text") or part.text is None:
                    raise bad_request(
                        f"Content part type {part.type!r} is not supported; only text is.",
                        f"input[{i}].content[{j}].type",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        # Chat templates know "system"; OpenAI's "developer" role is its newer name.
        messages.append({"role": "system" if item.role == "developer" else item.role, "content": content})
    return messages


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    return msgspec.convert(
        {
            "model": body.model,
            "messages": chat_messages(body),
            "max_completion_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "user": body.user,
        },
        ChatCompletionRequest,
    )


async def create_response(request: web.Request, server: ServerState) -> web.StreamResponse:
    try:
        body = await read_json(request, server, ResponsesRequest)
        arrival = time.monotonic()
    except APIError as error:
        unknown = _UNKNOWN_FIELD.search(error.message)
        if unknown and error.param is None:
            raise bad_request(
                f"{unknown.group('field')} is not a field of /v1/responses.", unknown.group("field")
            ) from None
        raise
    check_request(body)
    try:
        generation, output, _, _ = await prepare_chat(server, chat_request(body), responses.new_id("resp"), arrival)
    except APIError as error:
        if error.param is not None:
            first, dot, rest = error.param.partition(".")
            name, bracket, index = first.partition("[")
            error.param = PARAM_NAMES.get(name, name) + bracket + index + dot + rest
            error.message = error.message.replace("max_completion_tokens", "max_output_tokens")
        raise
    answer = ResponseBuilder(server, generation, body)
    async with generation.running():
        if body.stream:
            return await answer.stream(request, output.stream())
        await responses.run_to_completion(generation)
        state = generation.choices[0].state
        message, _ = output.message(state.text, state.finish_reason)
        payload = answer.response(message.content or "", done=True)
        return web.Response(body=msgspec.json.encode(payload), content_type="application/json")


class ResponseBuilder:
    """The response object and the stream's events for one generation."""

    def __init__(self, server: ServerState, generation: Generation, body: ResponsesRequest) -> None:
        self.server = server
        self.generation = generation
        self.body = body
        self.created_at = responses.now_seconds()
        self.message_id = responses.new_id("msg")
        self.sequence_number = 0

    def message(self, text: str, done: bool) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if done else []
        return {
            "type": "message",
            "id": self.message_id,
            "status": self.status if done else "in_progress",
            "role": "assistant",
            "content": content,
        }

    @property
    def status(self) -> str:
        return "incomplete" if self.generation.choices[0].state.finish_reason == "length" else "completed"

    def response(self, text: str, done: bool) -> dict[str, Any]:
        body = self.body
        status = self.status if done else "in_progress"
        usage = None
        if done:
            info = responses.usage(self.generation)
            usage = {
                "input_tokens": info.prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.generation.num_cached_tokens},
                "output_tokens": info.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": info.total_tokens,
            }
        return {
            "id": self.generation.request_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.server.model_name,
            "output": [self.message(text, done=True)] if done else [],
            "usage": usage,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "parallel_tool_calls": True,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "metadata": body.metadata or {},
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "truncation": "disabled",
            "user": body.user,
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"

    async def stream(self, request: web.Request, output: ChatOutputStream) -> web.StreamResponse:
        response = await sse.open_event_stream(request)
        timeout = self.server.write_timeout
        location = {"item_id": self.message_id, "output_index": 0, "content_index": 0}

        async def send(*events: bytes) -> None:
            await sse.write(request, response, b"".join(events), timeout)

        try:
            await send(
                self.event("response.created", response=self.response("", done=False)),
                self.event("response.in_progress", response=self.response("", done=False)),
                self.event("response.output_item.added", output_index=0, item=self.message("", done=False)),
                self.event(
                    "response.content_part.added",
                    **location,
                    part={"type": "output_text", "text": "", "annotations": []},
                ),
            )
            texts: list[str] = []
            try:
                async for _choice, update in self.generation.updates():
                    failure = responses.error_for_update(self.generation, update)
                    if failure is not None:
                        await send(self.error_event(failure))
                        return response
                    delta, _ = output.feed(update.text, update.finish_reason)
                    if delta.content:
                        texts.append(delta.content)
                        await send(
                            self.event(
                                "response.output_text.delta", **location, delta=delta.content, logprobs=[]
                            )
                        )
            except EngineDeadError as error:
                await send(self.error_event(APIError(503, f"The engine is not available: {error}")))
                return response
            text = "".join(texts)
            final = self.response(text, done=True)
            await send(
                self.event("response.output_text.done", **location, text=text, logprobs=[]),
                self.event("response.content_part.done", **location, part=final["output"][0]["content"][0]),
                self.event("response.output_item.done", output_index=0, item=final["output"][0]),
                self.event(f"response.{final['status']}", response=final),
            )
        except ConnectionResetError:
            pass  # the client went away; closing the generation aborts what is left
        return response

    def error_event(self, error: APIError) -> bytes:
        return self.event("error", code=str(error.status), message=error.message, param=error.param)
