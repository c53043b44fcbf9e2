"""Constrained output from a request: ``response_format``, ``structured_outputs``, vLLM's
``guided_*`` aliases, ``tool_choice`` required/named, ``allowed_token_ids`` and ``bad_words``, all
as fields of the engine's :class:`proto.SamplingParams` (the executor's sampler masks the logits).

Every grammar is parsed here first (xgrammar, no vocabulary needed), so a bad schema, regex or
grammar is a 400 naming the field and never reaches the engine. A request may carry one grammar.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec

import proto
from pied.api.errors import bad_request
from pied.api.params import check_token_ids
from pied.api.protocol import SamplingFields
from workers.grammar import choice_constraint, grammar_of

ToolChoice = str | dict[str, Any]  # "none" | "auto" | "required" | {"type": "function", ...}

# structured_outputs keys that only tune how a grammar is enforced; accepted values only.
_BACKENDS = (None, "auto", "xgrammar")


def _json_schema_constraint(schema: Any, param: str) -> proto.GrammarConstraint:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise bad_request(f"{param} is not valid JSON: {error}.", param) from None
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object).", param)
    return proto.GrammarConstraint(proto.GrammarKind.JSON_SCHEMA, json.dumps(schema))


def _from_response_format(response_format: dict[str, Any]) -> tuple[str, proto.GrammarConstraint] | None:
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", proto.GrammarConstraint(proto.GrammarKind.JSON_SCHEMA, "")
    if kind == "json_schema":
        json_schema = response_format.get("json_schema")
        if not isinstance(json_schema, dict) or "schema" not in json_schema:
            raise bad_request(
                'response_format {"type": "json_schema"} needs json_schema.schema.', "response_format.json_schema"
            )
        param = "response_format.json_schema.schema"
        return param, _json_schema_constraint(json_schema["schema"], param)
    raise bad_request(
        f"response_format type {kind!r} is not supported; use text, json_object or json_schema.",
        "response_format.type",
    )


def _from_structured_outputs(options: dict[str, Any]) -> list[tuple[str, proto.GrammarConstraint]]:
    found: list[tuple[str, proto.GrammarConstraint]] = []
    for key, value in options.items():
        param = f"structured_outputs.{key}"
        if value is None or value is False:
            continue
        if key == "json":
            found.append((param, _json_schema_constraint(value, param)))
        elif key == "json_object":
            found.append((param, proto.GrammarConstraint(proto.GrammarKind.JSON_SCHEMA, "")))
        elif key == "regex":
            found.append((param, _regex(value, param)))
        elif key == "choice":
            found.append((param, _choice(value, param)))
        elif key == "grammar":
            found.append((param, _ebnf(value, param)))
        elif key in ("backend", "_backend"):
            if value not in _BACKENDS:
                raise bad_request(f"{param} must be auto or xgrammar (pied's grammar engine), got {value!r}.", param)
        elif key in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
            continue  # pied's JSON is compact and its schemas strict: these hold whatever their value
        else:
            raise bad_request(f"{param} is not supported.", param)
    return found


def _regex(value: Any, param: str) -> proto.GrammarConstraint:
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty regular expression.", param)
    return proto.GrammarConstraint(proto.GrammarKind.REGEX, value)


def _ebnf(value: Any, param: str) -> proto.GrammarConstraint:
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty EBNF grammar.", param)
    return proto.GrammarConstraint(proto.GrammarKind.EBNF, value)


def _choice(value: Any, param: str) -> proto.GrammarConstraint:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise bad_request(f"{param} must be a non-empty list of non-empty strings.", param)
    return choice_constraint(value)


def tool_choice_of(tools: list[dict[str, Any]] | None, tool_choice: Any, auto_enabled: bool) -> ToolChoice:
    """The request's effective tool_choice, checked (OpenAI's default: auto when tools are given,
    here only when the server parses tool calls, else none, as vLLM does)."""
    if tool_choice is None:
        return "auto" if tools and auto_enabled else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice must be none, auto, required or a function, got {tool_choice!r}.", "tool_choice")
        if tool_choice != "none" and not tools:
            raise bad_request(f'tool_choice "{tool_choice}" needs tools.', "tool_choice")
        if tool_choice == "auto" and not auto_enabled:
            raise bad_request(
                '"auto" tool choice requires the server to run with --enable-auto-tool-choice and --tool-call-parser.',
                "tool_choice",
            )
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request('A named tool_choice is {"type": "function", "function": {"name": ...}}.', "tool_choice")
    if function["name"] not in {tool["function"]["name"] for tool in tools or []}:
        raise bad_request(f"Tool {function['name']!r} is not among the request's tools.", "tool_choice")
    return tool_choice


def check_tools(tools: list[dict[str, Any]] | None) -> None:
    for i, tool in enumerate(tools or []):
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request('Each tool is {"type": "function", "function": {...}}.', f"tools[{i}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request("A tool's function needs a name.", f"tools[{i}].function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request("A tool's parameters must be a JSON schema object.", f"tools[{i}].function.parameters")


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _from_tools(tools: list[dict[str, Any]], tool_choice: ToolChoice) -> proto.GrammarConstraint | None:
    """vLLM's schemas: required is a non-empty array of ``{"name", "parameters"}``, one of the
    tools each; named is that tool's parameters."""
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        function = next(tool["function"] for tool in tools if tool["function"]["name"] == name)
        return _json_schema_constraint(_parameters(function), "tool_choice")
    if tool_choice != "required":
        return None
    one_of = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool["function"]["name"]]},
                "parameters": _parameters(tool["function"]),
            },
            "required": ["name", "parameters"],
        }
        for tool in tools
    ]
    return _json_schema_constraint({"type": "array", "minItems": 1, "items": {"anyOf": one_of}}, "tools")


async def grammar_constraint(
    body: SamplingFields,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = "none",
) -> proto.GrammarConstraint | None:
    """The one grammar the request asks for (None: none); parsed here, a 400 naming it if bad.

    Parsed on a thread: the first grammar imports xgrammar (seconds), and a large schema takes
    a while to parse; the event loop keeps serving every other stream meanwhile."""
    found: list[tuple[str, proto.GrammarConstraint]] = []
    if body.response_format is not None:
        entry = _from_response_format(body.response_format)
        if entry is not None:
            found.append(entry)
    if body.structured_outputs is not None:
        found.extend(_from_structured_outputs(body.structured_outputs))
    if body.guided_json is not None:
        found.append(("guided_json", _json_schema_constraint(body.guided_json, "guided_json")))
    if body.guided_regex is not None:
        found.append(("guided_regex", _regex(body.guided_regex, "guided_regex")))
    if body.guided_choice is not None:
        found.append(("guided_choice", _choice(body.guided_choice, "guided_choice")))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", _ebnf(body.guided_grammar, "guided_grammar")))
    if body.guided_decoding_backend not in _BACKENDS:
        raise bad_request(
            f"guided_decoding_backend must be auto or xgrammar, got {body.guided_decoding_backend!r}.",
            "guided_decoding_backend",
        )
    tool_constraint = _from_tools(tools or [], tool_choice)
    if tool_constraint is not None:
        found.append(("tool_choice", tool_constraint))
    if len(found) > 1:
        raise bad_request(
            f"A request may have one structured output constraint; got {found[0][0]} and {found[1][0]}.",
            found[1][0],
        )
    if not found:
        return None
    param, constraint = found[0]
    try:
        await asyncio.to_thread(grammar_of, constraint)
    except ValueError as error:
        raise bad_request(f"{param} is not a valid constraint: {error}", param) from None
    return constraint


async def bad_words_token_ids(server: Any, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad_words: each word alone and after a space (how it appears
    mid-text), every distinct token sequence banned."""
    sequences: list[list[int]] = []
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise bad_request("bad_words must be non-empty strings.", "bad_words")
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = await server.encode(text, False, "bad_words")
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


LOGIT_BIAS_RANGE = 100.0  # OpenAI's: a bias is clamped to [-100, 100], as vLLM clamps it


def logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as strings -> bias) as the engine takes it: ids checked
    against the vocabulary, biases clamped to [-100, 100]."""
    result = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias") from None
        result[token_id] = min(LOGIT_BIAS_RANGE, max(-LOGIT_BIAS_RANGE, float(value)))
    check_token_ids(list(result), vocab_size, "logit_bias")
    return result


async def constrain(
    server: Any, body: SamplingFields, params: proto.SamplingParams, grammar: proto.GrammarConstraint | None
) -> proto.SamplingParams:
    """``params`` with the request's masks (allowed_token_ids, bad_words, the grammar) and its
    logit_bias."""
    changes: dict[str, Any] = {}
    if body.allowed_token_ids is not None:
        if not body.allowed_token_ids:
            raise bad_request("allowed_token_ids must not be empty.", "allowed_token_ids")
        check_token_ids(body.allowed_token_ids, server.vocab_size, "allowed_token_ids")
        changes["allowed_token_ids"] = list(dict.fromkeys(body.allowed_token_ids))  # each id once
    if body.bad_words:
        changes["bad_words_token_ids"] = await bad_words_token_ids(server, body.bad_words)
    if body.logit_bias:
        changes["logit_bias"] = logit_bias(body.logit_bias, server.vocab_size)
    if grammar is not None:
        changes["grammar"] = grammar
    return msgspec.structs.replace(params, **changes) if changes else params
