"""``--tool-call-parser``: the model's tool-call text as OpenAI ``tool_calls``.

Formats, as vLLM's parsers of the same names read them:

- ``hermes`` (Qwen, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any
  number, after optional content.
- ``llama3_json``: the whole output is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``), several separated by ``;``.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name": ..., "arguments": {...}}``.

Text that looks like a tool call but does not parse stays content (as vLLM does). Streaming
(:class:`ToolCallStream`) passes content through until a tool call may begin, then streams each
call as vLLM does: a first delta with its index, id and name, then fragments of its arguments. The
arguments of an object are the model's own JSON text, whole or streamed, so the streamed fragments
add up to exactly what the whole-output parse returns.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_PARSERS = ("hermes", "llama3_json", "mistral")

_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
HERMES_START = "<tool_call>"
MISTRAL_START = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One OpenAI tool call; ``arguments`` is kept as text when it is text, else JSON-encoded."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": text},
    }


def _call_from_object(item: Any, arguments_key: str) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ValueError("a tool call must be an object with a string name")
    arguments = item.get(arguments_key, item.get("arguments", item.get("parameters", {})))
    return tool_call(item["name"], arguments if arguments is not None else {})


def _json_objects(text: str) -> list[Any]:
    """JSON values separated by ``;`` or whitespace (llama3_json's several calls)."""
    decoder = json.JSONDecoder()
    values = []
    position = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n;":
            position += 1
        if position == len(text):
            return values
        value, position = decoder.raw_decode(text, position)
        values.append(value)


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a whole output; content None when only tool calls remain."""
    try:
        if parser == "hermes":
            start = text.find(HERMES_START)
            if start < 0:
                return text, []
            calls = [_call_from_object(json.loads(body), "arguments") for body in _HERMES.findall(text[start:])]
            content = text[:start]
        elif parser == "llama3_json":
            body = text.strip()
            if body.startswith(PYTHON_TAG):
                body = body[len(PYTHON_TAG) :]
            if not body.lstrip().startswith("{"):
                return text, []
            calls = [_call_from_object(item, "parameters") for item in _json_objects(body)]
            content = ""
        elif parser == "mistral":
            start = text.find(MISTRAL_START)
            if start < 0:
                return text, []
            items = json.loads(text[start + len(MISTRAL_START) :])
            items = items if isinstance(items, list) else [items]
            calls = [_call_from_object(item, "arguments") for item in items]
            content = text[:start]
        else:
            raise ValueError(f"unknown tool call parser {parser!r}")
    except (json.JSONDecodeError, ValueError):
        return text, []
    if not calls:
        return text, []
    # Valid as a whole: the same calls with the arguments text as written (what a stream sends).
    section = text.strip() if parser == "llama3_json" else text[start:]
    calls = _whole_calls(parser, section)
    return (content if content.strip() else None), calls


def forced_tool_calls(tool_choice: str | dict[str, Any], text: str) -> list[dict[str, Any]]:
    """The calls of an output that structured output forced (tool_choice required or named):
    required is a JSON array of ``{"name", "parameters"}``, named is the arguments object."""
    if isinstance(tool_choice, dict):
        return [tool_call(tool_choice["function"]["name"], text)]
    try:
        items = json.loads(text)
        return [_call_from_object(item, "parameters") for item in items]
    except (json.JSONDecodeError, ValueError, TypeError):
        return []  # cut short (max_tokens): no complete calls


# ---------------------------------------------------------------- incremental scanning

ARGUMENT_KEYS = ("arguments", "parameters")
_DECODER = json.JSONDecoder()
_SPACE = " \t\r\n"


@dataclass
class PartialCall:
    """One tool call as far as the output has written it: its name once complete, the raw text of
    its arguments so far, and whether its object has closed."""

    name: str | None = None
    raw_arguments: str | None = None  # the arguments value's text as the model wrote it
    arguments_closed: bool = False
    complete: bool = False

    @property
    def streamable_arguments(self) -> str:
        """The arguments text that is final so far: an object or array streams as it is written; a
        string or any other value only once complete (its decoded text differs from its source)."""
        if self.complete or self.arguments_closed:
            return self.arguments
        raw = self.raw_arguments or ""
        return raw if raw[:1] in ("{", "[") else ""

    @property
    def arguments(self) -> str:
        """The final arguments string: the model's own JSON text for an object (so what streams is
        exactly what a whole-output parse returns), a string's text, or any other value as JSON."""
        raw = self.raw_arguments
        if raw is None:
            return "{}"
        if raw[:1] in ("{", "["):
            return raw
        value = json.loads(raw)
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _skip(text: str, position: int, chars: str = _SPACE) -> int:
    while position < len(text) and text[position] in chars:
        position += 1
    return position


def _value_end(text: str, position: int) -> int | None:
    """The end of the JSON value starting at ``position``, or None while it is not complete."""
    first = text[position]
    if first in "{[":
        depth, in_string, escaped = 0, False, False
        for index in range(position, len(text)):
            char = text[index]
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return index + 1
        return None
    try:
        _, end = _DECODER.raw_decode(text, position)
    except json.JSONDecodeError:
        return None
    # A number may go on: complete only once something follows it.
    return end if first == '"' or end < len(text) else None


def _scan_object(text: str, position: int) -> tuple[PartialCall, int | None]:
    """The call in the JSON object at ``text[position] == "{"``, and the end of the object (None
    while open). Raises ValueError on text that can no longer be a call object."""
    call = PartialCall()
    index = position + 1
    while True:
        index = _skip(text, index, _SPACE + ",")
        if index >= len(text):
            return call, None
        if text[index] == "}":
            call.complete = True
            return call, index + 1
        if text[index] != '"':
            raise ValueError("a tool call object's keys are strings")
        try:
            key, index = _DECODER.raw_decode(text, index)
        except json.JSONDecodeError:
            return call, None  # the key is still being written
        index = _skip(text, index)
        if index >= len(text):
            return call, None
        if text[index] != ":":
            raise ValueError("a key without a value")
        index = _skip(text, index + 1)
        if index >= len(text):
            return call, None
        end = _value_end(text, index)
        if key in ARGUMENT_KEYS and call.raw_arguments is None:
            call.raw_arguments = text[index:end]
            call.arguments_closed = end is not None
        elif key == "name" and end is not None:
            name = json.loads(text[index:end])
            if not isinstance(name, str):
                raise ValueError("a tool call's name is a string")
            call.name = name
        if end is None:
            return call, None
        index = end


def scan_tool_calls(parser: str, text: str) -> list[PartialCall]:
    """The calls in ``text`` (an output from its tool-call marker on, or llama3_json's whole output)
    as far as written. Raises ValueError where the text can no longer be tool calls."""
    calls: list[PartialCall] = []
    if parser == "hermes":
        index = 0
        while (start := text.find(HERMES_START, index)) >= 0:
            index = _skip(text, start + len(HERMES_START))
            if index >= len(text):
                break
            if text[index] != "{":
                raise ValueError("a hermes tool call is a JSON object")
            call, end = _scan_object(text, index)
            calls.append(call)
            if end is None:
                break
            index = end
        return calls
    if parser == "mistral":
        index = _skip(text, text.find(MISTRAL_START) + len(MISTRAL_START))
        if index >= len(text):
            return calls
        if text[index] == "[":
            index += 1
        separators = _SPACE + ","
    elif parser == "llama3_json":
        index = _skip(text, 0)
        if text.startswith(PYTHON_TAG, index):
            index += len(PYTHON_TAG)
        separators = _SPACE + ";"
    else:
        raise ValueError(f"unknown tool call parser {parser!r}")
    while True:
        index = _skip(text, index, separators)
        if index >= len(text) or text[index] == "]":
            return calls
        if text[index] != "{":
            raise ValueError("a tool call is a JSON object")
        call, end = _scan_object(text, index)
        calls.append(call)
        if end is None:
            return calls
        index = end


def _whole_calls(parser: str, text: str) -> list[dict[str, Any]]:
    """The calls of a tool-call section that parsed as a whole, with the arguments text a stream
    of the same text sends (the model's own JSON text)."""
    return [tool_call(call.name or "", call.arguments) for call in scan_tool_calls(parser, text)]


@dataclass
class ToolCallStream:
    """Streams content deltas until a tool call may begin, then the calls as they are written, as
    vLLM streams them: per call a first delta with its ``index``, ``id``, ``type`` and function
    name, then fragments of its arguments text. At the end the whole text is parsed as
    :func:`parse_tool_calls` would; if it does not parse, whatever no delta has sent yet becomes
    content."""

    parser: str
    max_calls: int | None = None  # parallel_tool_calls false: only the first call
    held: str = ""  # text that may be (or is) a tool call
    in_call: bool = False
    started: bool = False  # any non-space text seen (llama3_json decides at the first one)
    sent: list[tuple[str, int]] = field(default_factory=list)  # per call sent: (id, argument chars)

    def _marker(self) -> str:
        return MISTRAL_START if self.parser == "mistral" else HERMES_START

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """The content that can be sent now, and tool call deltas."""
        content = self._content(delta)
        if not self.in_call:
            return content, []
        try:
            calls = scan_tool_calls(self.parser, self.held)
        except ValueError:
            return content, []  # not a call after all: the end decides what it is
        return content, self._deltas(calls)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end of the output: the content still held, and the last tool call deltas."""
        held = self.held
        if not held:
            return "", []
        content, calls = parse_tool_calls(self.parser, held)
        if not calls:
            # Not tool calls. What was already sent as a call stays sent (the client has it).
            return ("" if self.sent else held), []
        return (content or "") if not self.sent else "", self._deltas(scan_tool_calls(self.parser, held))

    def _content(self, delta: str) -> str:
        text = self.held + delta
        self.held = ""
        if self.in_call:
            self.held = text
            return ""
        if self.parser == "llama3_json":
            if not self.started:
                stripped = text.lstrip()
                if not stripped or PYTHON_TAG.startswith(stripped):
                    self.held = text
                    return ""
                self.started = True
                if stripped.startswith("{") or stripped.startswith(PYTHON_TAG):
                    self.in_call, self.held = True, text
                    return ""
            return text
        marker = self._marker()
        start = text.find(marker)
        if start >= 0:
            self.in_call, self.held = True, text[start:]
            return text[:start]
        for length in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-length:]):
                self.held = text[-length:]
                return text[:-length]
        return text

    def _deltas(self, calls: list[PartialCall]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if self.max_calls is not None:
            calls = calls[: self.max_calls]
        for index, call in enumerate(calls):
            if index == len(self.sent):
                if call.name is None:
                    break  # a call's first delta names it; later ones wait for it
                call_id = f"chatcmpl-tool-{uuid.uuid4().hex}"
                self.sent.append((call_id, 0))
                deltas.append(
                    {"index": index, "id": call_id, "type": "function", "function": {"name": call.name}}
                )
            call_id, num_sent = self.sent[index]
            arguments = call.streamable_arguments
            if len(arguments) > num_sent:
                deltas.append({"index": index, "function": {"arguments": arguments[num_sent:]}})
                self.sent[index] = (call_id, len(arguments))
        return deltas
