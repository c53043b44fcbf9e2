"""``--tool-call-parser``: the model's tool-call text as OpenAI ``tool_calls``.

Formats, as vLLM's parsers of the same names read them:

- ``hermes`` (Qwen, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any
  number, after optional content.
- ``llama3_json``: the whole output is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``), several separated by ``;``.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name": ..., "arguments": {...}}``.

Text that looks like a tool call but does not parse stays content (as vLLM does). Streaming
(:class:`ToolCallStream`) passes content through until a tool call may begin, then holds the rest
and emits the calls when the output ends: each call is one delta with its whole arguments string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
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


@dataclass
class ToolCallStream:
    """Streams content deltas while holding back everything from a possible tool call on."""

    parser: str
    held: str = ""  # text that may be (or is) a tool call
    in_call: bool = False
    started: bool = False  # any non-space text seen (llama3_json decides at the first one)

    def _marker(self) -> str:
        return MISTRAL_START if self.parser == "mistral" else HERMES_START

    def feed(self, delta: str) -> str:
        """The content that can be sent now."""
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

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end of the output: the content still held, and the tool calls."""
        held, self.held = self.held, ""
        if not held:
            return "", []
        content, calls = parse_tool_calls(self.parser, held)
        return (content or ""), calls
