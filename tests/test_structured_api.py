"""Structured output, tool calls and reasoning through a real server and the openai client.

The tiny model's weights are random, so its text is too: every output here is driven by a
constraint (a JSON schema, a choice, a regex), which makes it valid whatever the weights, and the
assertions check what the server makes of it (parsed JSON, tool_calls, reasoning_content).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from server import api_server_fixtures

MODEL = "tiny"

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "units": {"enum": ["metric", "imperial"]},
    },
    "required": ["city", "days", "units"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# What a Hermes-style model writes to call a tool; forced here with a choice constraint.
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def loads(text: str):
    # strict=False: xgrammar's JSON strings admit raw control characters that random weights pick.
    return json.loads(text, strict=False)


server, client = api_server_fixtures(
    MODEL,
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "hermes",
    "--reasoning-parser",
    "qwen3",
    max_model_len=512,
    timeout=120,
)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_response_format_gives_valid_json(client, temperature):
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=200,
        temperature=temperature,
        response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(loads(choice.message.content), SCHEMA)


def test_json_schema_streamed_and_json_object(client):
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=200,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(loads(text), SCHEMA)
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=300, response_format={"type": "json_object"}
    )
    if response.choices[0].finish_reason == "stop":  # any JSON may run long; complete only at stop
        loads(response.choices[0].message.content)


def test_structured_outputs_on_completions(client):
    for extra, check in (
        ({"structured_outputs": {"regex": r"\d{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"\d{3}-[a-z]{2}", t)),
        ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"guided_regex": "[xyz]{4}"}, lambda t: re.fullmatch("[xyz]{4}", t)),
        ({"structured_outputs": {"grammar": 'root ::= "a" [0-9] [0-9]'}}, lambda t: re.fullmatch(r"a\d\d", t)),
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(loads(t), SCHEMA) is None),
    ):
        response = client.completions.create(
            model=MODEL, prompt="The answer:", max_tokens=200, temperature=1.0, extra_body=extra
        )
        text = response.choices[0].text
        assert response.choices[0].finish_reason == "stop", (extra, text)
        assert check(text), (extra, text)


def test_allowed_token_ids_and_bad_words(client, server):
    tokens = server.request("POST", "/tokenize", {"prompt": " the", "add_special_tokens": False}).json()["tokens"]
    assert len(tokens) == 1
    response = client.completions.create(
        model=MODEL, prompt="x", max_tokens=4, extra_body={"allowed_token_ids": tokens, "ignore_eos": True}
    )
    assert response.choices[0].text == " the" * 4
    # bad_words: the banned word never appears even when it is the only other choice.
    allowed = server.request("POST", "/tokenize", {"prompt": " the and", "add_special_tokens": False}).json()["tokens"]
    response = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=6,
        extra_body={"allowed_token_ids": allowed, "bad_words": ["the"], "ignore_eos": True},
    )
    assert response.choices[0].text == " and" * 6


def test_a_choice_with_min_tokens_ends_with_the_choice(client):
    # Past the choice the grammar allows only the end, which min_tokens forbids: the grammar wins,
    # not a token the masks left no room for (it was "<unk>" until min_tokens).
    response = client.completions.create(
        model=MODEL, prompt="x", max_tokens=12, temperature=1.0,
        extra_body={"structured_outputs": {"choice": ["sunny"]}, "min_tokens": 8, "skip_special_tokens": False},
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.text.replace("</s>", "") == "sunny" and "<unk>" not in choice.text, choice.text
    assert choice.finish_reason == "stop" and response.usage.completion_tokens >= 8


def test_bad_constraints_are_400s_naming_the_field(server):
    for body, param in (
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
        ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
        ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER_TOOL]}, "tool_choice"),
    ):
        response = server.request("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, **body})
        assert response.status == 400, (body, response.body)
        assert response.json()["error"]["param"] == param, (body, response.json())


def test_auto_tool_calls_are_parsed(client):
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER_TOOL, TIME_TOOL],
        max_completion_tokens=100,
        extra_body={"structured_outputs": {"choice": [HERMES_CALL]}},
    )
    response = client.chat.completions.create(**kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # Streamed as vLLM streams them: the call's index, id and name first, then its arguments in
    # fragments as the model writes them (several chunks, not one at the end), adding up to exactly
    # the non-streamed call; and the same finish reason.
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    with_calls = [chunk.choices[0].delta.tool_calls for chunk in chunks if chunk.choices and chunk.choices[0].delta.tool_calls]
    deltas = [tc for calls in with_calls for tc in calls]
    assert len(with_calls) > 2, deltas
    first, *rest = deltas
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == call.function.arguments
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_call_round_trip_is_rendered(client):
    # What the openai SDK sends back after a call: the assistant's message with content null and
    # its tool_calls, then the tool's result. The tiny model's template (as many do) concatenates
    # content: null content renders as "", as vLLM renders it.
    call = {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    conversation = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
    ]
    answer = dict(model=MODEL, tools=[WEATHER_TOOL], max_completion_tokens=20,
                  extra_body={"structured_outputs": {"choice": ["It is sunny."]}})  # fmt: skip
    response = client.chat.completions.create(messages=conversation, **answer)
    assert response.choices[0].message.content == "It is sunny."
    # The tool's result is in the prompt: the same conversation without it is shorter.
    shorter = client.chat.completions.create(messages=conversation[:2], **answer)
    assert response.usage.prompt_tokens > shorter.usage.prompt_tokens


def test_content_without_a_tool_call_stays_content(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER_TOOL],
        max_completion_tokens=20,
        extra_body={"structured_outputs": {"choice": ["It is sunny."]}},
    )
    assert response.choices[0].message.content == "It is sunny."
    assert not response.choices[0].message.tool_calls
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_are_enforced(client, stream):
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kwargs = dict(
            model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL], max_completion_tokens=200,
            tool_choice=tool_choice, temperature=1.0,
        )
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            calls = [tc for chunk in chunks if chunk.choices for tc in (chunk.choices[0].delta.tool_calls or [])]
            finish = chunks[-1].choices[0].finish_reason
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            calls, finish = choice.message.tool_calls, choice.finish_reason
        assert finish == "tool_calls" and calls, (tool_choice, finish)
        for call in calls:
            assert call.function.name in ("get_weather", "get_time")
            arguments = loads(call.function.arguments)
            schema = (WEATHER_TOOL if call.function.name == "get_weather" else TIME_TOOL)["function"]["parameters"]
            jsonschema.validate(arguments, schema)
        if isinstance(tool_choice, dict):
            assert [call.function.name for call in calls] == ["get_weather"]


THINK = r"<think>[a-z]{2,6}( [a-z]{2,6}){0,2}</think>[a-z]{2,8}"


def test_reasoning_content_is_split_off(client):
    kwargs = dict(
        model=MODEL, messages=MESSAGES, max_completion_tokens=100, temperature=1.0,
        extra_body={"structured_outputs": {"regex": THINK}},
    )
    for _ in range(3):
        message = client.chat.completions.create(**kwargs).choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert re.fullmatch(r"[a-z]{2,6}( [a-z]{2,6}){0,2}", reasoning), reasoning
        assert re.fullmatch(r"[a-z]{2,8}", message.content), message.content
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        streamed_reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        streamed_content = "".join(d.content or "" for d in deltas)
        assert re.fullmatch(r"[a-z]{2,6}( [a-z]{2,6}){0,2}", streamed_reasoning), streamed_reasoning
        assert re.fullmatch(r"[a-z]{2,8}", streamed_content), streamed_content
        assert "<think>" not in streamed_content + streamed_reasoning


@pytest.mark.parametrize(
    ("output", "reasoning", "content"),
    [("no think</think>answer", None, "no think</think>answer"), ("<think>unclosed", "unclosed", "")],
)
def test_streamed_and_whole_outputs_split_reasoning_alike(client, output, reasoning, content):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=40,
                  extra_body={"structured_outputs": {"choice": [output]}})  # fmt: skip
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert (message.model_extra.get("reasoning_content"), message.content or "") == (reasoning, content)
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(stream=True, **kwargs) if chunk.choices]
    streamed_reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert (streamed_reasoning or None, "".join(d.content or "" for d in deltas)) == (reasoning, content)


def test_include_reasoning_false_drops_it(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=100,
        extra_body={"structured_outputs": {"regex": THINK}, "include_reasoning": False},
    )
    assert response.choices[0].message.model_extra.get("reasoning_content") is None
    assert re.fullmatch(r"[a-z]{2,8}", response.choices[0].message.content)
