"""Tool-call and reasoning parsers on whole outputs, and streamed in every split of the same text:
the streamed pieces always add up to what the whole-output parse gives."""

from __future__ import annotations

import json
import random

import pytest

from pied.api.chat_output import ChatOutputFormat
from pied.api.reasoning import ReasoningStream, split_reasoning
from pied.api.tool_parsers import forced_tool_calls, parse_tool_calls

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def args(call: dict) -> dict:
    return json.loads(call["function"]["arguments"])


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        ("hermes", f"Sure.<tool_call>\n{json.dumps(CALL)}\n</tool_call>", "Sure.", [CALL]),
        ("hermes", f"<tool_call>{json.dumps(CALL)}</tool_call><tool_call>{json.dumps(CALL)}</tool_call>", None, [CALL, CALL]),
        ("hermes", "no tools here", "no tools here", []),
        ("hermes", "<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [CALL]),
        ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
         '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [CALL, CALL]),
        ("llama3_json", "Hello {", "Hello {", []),
        ("mistral", f"[TOOL_CALLS][{json.dumps(CALL)}]", None, [CALL]),
        ("mistral", "plain", "plain", []),
    ],
)
def test_parse_tool_calls(parser, text, content, calls):
    got_content, got_calls = parse_tool_calls(parser, text)
    assert got_content == content
    assert [call["function"]["name"] for call in got_calls] == [c["name"] for c in calls]
    assert [args(call) for call in got_calls] == [c["arguments"] for c in calls]
    assert all(call["type"] == "function" and call["id"] for call in got_calls)


def test_forced_tool_calls():
    [call] = forced_tool_calls({"type": "function", "function": {"name": "f"}}, '{"a": 1}')
    assert call["function"] == {"name": "f", "arguments": '{"a": 1}'}
    calls = forced_tool_calls("required", '[{"name": "f", "parameters": {}}, {"name": "g", "parameters": {"x": 2}}]')
    assert [c["function"]["name"] for c in calls] == ["f", "g"]
    assert forced_tool_calls("required", "[{") == []


@pytest.mark.parametrize(
    ("parser", "text", "reasoning", "content"),
    [
        ("qwen3", "<think>hmm</think>answer", "hmm", "answer"),
        ("qwen3", "hmm</think>answer", None, "hmm</think>answer"),  # not opened: content, as streamed
        ("qwen3", "<think>unclosed", "unclosed", ""),
        ("qwen3", "just an answer", None, "just an answer"),
        ("deepseek_r1", "hmm</think>answer", "hmm", "answer"),
        ("deepseek_r1", "<think>still thinking", "still thinking", ""),
    ],
)
def test_split_reasoning(parser, text, reasoning, content):
    assert split_reasoning(parser, text) == (reasoning, content)


def random_splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("text", ["<think>a b</think>c d", "<think>x</thi", "abc</think>", "<thin", "plain <think> text"])
def test_reasoning_stream_adds_up(parser, text):
    for seed in range(30):
        stream = ReasoningStream(parser)
        pieces = random_splits(text, seed) if len(text) > 1 else [text]
        reasoning = content = ""
        for i, piece in enumerate(pieces):
            r, c = stream.feed(piece, final=i == len(pieces) - 1)
            reasoning, content = reasoning + r, content + c
        # However the output is cut into deltas, the stream splits it as the whole output is split.
        whole_reasoning, whole_content = split_reasoning(parser, text)
        assert (reasoning or None, content) == (whole_reasoning or None, whole_content), (pieces, reasoning, content)


def merged_calls(deltas: list[dict]) -> list[dict]:
    """Streamed tool call deltas put together as a client does, checking vLLM's order: a call's
    first delta has its index, id, type and name; later ones add argument fragments."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        if delta["index"] not in calls:
            assert delta["id"] and delta["type"] == "function" and delta["function"]["name"], delta
            assert delta["index"] == len(calls), delta  # calls begin in order
            calls[delta["index"]] = {"name": delta["function"]["name"], "arguments": ""}
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}, delta
        calls[delta["index"]]["arguments"] += delta["function"].get("arguments", "")
    return [calls[index] for index in sorted(calls)]


TWO_CALLS = '{"name": "f", "arguments": {"s": "a } ] \\" b", "n": [1, {"x": 2.5}]}}'
ARGUMENTS_FIRST = '{"arguments": {"city": "Paris"}, "name": "get_weather"}'
STRING_ARGUMENTS = '{"name": "g", "arguments": "{\\"q\\": 1}"}'


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral"])
def test_tool_call_stream_adds_up(parser):
    texts = {
        "hermes": [
            f"I will call.<tool_call>\n{json.dumps(CALL)}\n</tool_call>",
            f"<tool_call>{TWO_CALLS}</tool_call>\n<tool_call>{ARGUMENTS_FIRST}</tool_call>",
            f"<tool_call>{STRING_ARGUMENTS}</tool_call>",
            '<tool_call>{"name": "n", "arguments": 42}</tool_call>',
            "no call <tool_ at all",
            "<tool_call>{not json</tool_call>",
            "plain",
        ],
        "llama3_json": [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            f'<|python_tag|>{TWO_CALLS}; {ARGUMENTS_FIRST.replace("arguments", "parameters")}',
            "  plain text",
            "<|python",
        ],
        "mistral": [f"ok [TOOL_CALLS][{json.dumps(CALL)}, {TWO_CALLS}]", "[TOOL_CALLS] broken", "plain"],
    }[parser]
    for parallel in (True, False):
        output = ChatOutputFormat(tool_call_parser=parser, tool_choice="auto", parallel_tool_calls=parallel)
        for text in texts:
            whole, finish = output.message(text, "stop")
            for seed in range(20):
                stream = output.stream()
                pieces = random_splits(text, seed)
                content, deltas, last_finish = "", [], None
                for i, piece in enumerate(pieces):
                    delta, last_finish = stream.feed(piece, "stop" if i == len(pieces) - 1 else None)
                    content += delta.content or ""
                    deltas += delta.tool_calls or []
                assert content == (whole.content or ""), (pieces, content)
                assert merged_calls(deltas) == [c["function"] for c in whole.tool_calls], pieces
                assert last_finish == finish


def test_tool_calls_stream_while_written():
    """The name goes out as soon as it is complete, the arguments as they are written: not one
    chunk at the end."""
    stream = ChatOutputFormat(tool_call_parser="hermes", tool_choice="auto").stream()
    text = f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>"
    sent = []
    for char in text:
        delta, _ = stream.feed(char, None)
        sent.append(delta.tool_calls or [])
    _, finish = stream.feed("", "stop")
    name_at = next(i for i, deltas in enumerate(sent) if deltas)
    assert text[: name_at + 1].endswith('"get_weather"')
    assert sent[name_at][0]["function"] == {"name": "get_weather"}
    fragments = [d["function"]["arguments"] for deltas in sent[name_at + 1 :] for d in deltas]
    assert len(fragments) == len('{"city": "Paris"}') and "".join(fragments) == '{"city": "Paris"}'
    assert finish == "tool_calls"


def test_parser_flags_are_checked_before_start():
    from pied.serve import ServeOptions
    from proto.config import ConfigError

    ServeOptions(enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3").validate()
    for options, flag in (
        (ServeOptions(tool_call_parser="nope"), "--tool-call-parser"),
        (ServeOptions(enable_auto_tool_choice=True), "--enable-auto-tool-choice"),
        (ServeOptions(reasoning_parser="nope"), "--reasoning-parser"),
    ):
        with pytest.raises(ConfigError, match=flag):
            options.validate()
