"""Every field of vLLM's chat and text completion requests is honoured or refused with a 400
naming it; none is dropped unseen.

The lists are vLLM's ``ChatCompletionRequest`` and ``CompletionRequest`` fields
(``vllm/entrypoints/openai/protocol.py``, vllm-project/vllm at 0052bed3, plus the newer
``structured_outputs``, ``return_token_ids`` and ``thinking_token_budget``). Each is sent with a
value that is not its default, against a real server.
"""

from __future__ import annotations

import msgspec
import pytest
from server import ServerProcess, running_server

from pied.api.protocol import ChatCompletionRequest, CompletionRequest
from pied.api.request_fields import UNSUPPORTED

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# field -> (a non-default value, other fields it needs, "ok" or the 400's param)
COMMON = {
    "model": ("tiny", {}, "ok"),
    "frequency_penalty": (0.5, {}, "ok"),
    "logit_bias": ({"5": 1.0}, {}, "ok"),
    "max_tokens": (3, {}, "ok"),
    "n": (2, {}, "ok"),
    "presence_penalty": (0.5, {}, "ok"),
    "response_format": ({"type": "json_object"}, {}, "ok"),
    "seed": (7, {}, "ok"),
    "stop": (["zz"], {}, "ok"),
    "stream": (True, {}, "ok"),
    "stream_options": ({"include_usage": True}, {"stream": True}, "ok"),
    "temperature": (0.5, {}, "ok"),
    "top_p": (0.9, {}, "ok"),
    "user": ("someone", {}, "ok"),
    "use_beam_search": (True, {}, "use_beam_search"),
    "top_k": (5, {}, "ok"),
    "min_p": (0.1, {}, "ok"),
    "repetition_penalty": (1.1, {}, "ok"),
    "length_penalty": (0.5, {}, "length_penalty"),
    "stop_token_ids": ([3], {}, "ok"),
    "include_stop_str_in_output": (True, {}, "ok"),
    "ignore_eos": (True, {}, "ok"),
    "min_tokens": (1, {}, "ok"),
    "skip_special_tokens": (False, {}, "ok"),
    "spaces_between_special_tokens": (False, {}, "spaces_between_special_tokens"),
    "truncate_prompt_tokens": (4, {}, "ok"),
    "prompt_logprobs": (1, {}, "ok"),
    "allowed_token_ids": ([5, 6], {}, "ok"),
    "bad_words": (["the"], {}, "ok"),
    "add_special_tokens": (True, {}, "ok"),
    "guided_json": ({"type": "object"}, {}, "ok"),
    "guided_regex": ("a+", {}, "ok"),
    "guided_choice": (["a", "b"], {}, "ok"),
    "guided_grammar": ('root ::= "a"', {}, "ok"),
    "guided_decoding_backend": ("xgrammar", {}, "ok"),
    "guided_whitespace_pattern": (" ", {}, "guided_whitespace_pattern"),
    "structured_outputs": ({"regex": "b+"}, {}, "ok"),
    "priority": (1, {}, "priority"),
    "request_id": ("mine", {}, "request_id"),
    "logits_processors": (["my.Processor"], {}, "logits_processors"),
    "return_tokens_as_token_ids": (True, {}, "return_tokens_as_token_ids"),
    "return_token_ids": (True, {}, "return_token_ids"),
    "cache_salt": ("salt", {}, "cache_salt"),
    "kv_transfer_params": ({"a": 1}, {}, "kv_transfer_params"),
    "vllm_xargs": ({"a": 1}, {}, "vllm_xargs"),
}
CHAT = {
    **COMMON,
    "messages": ([{"role": "user", "content": "hi there"}], {}, "ok"),
    "logprobs": (True, {}, "ok"),
    "top_logprobs": (2, {"logprobs": True}, "ok"),
    "max_completion_tokens": (3, {}, "ok"),
    "tools": ([TOOL], {}, "ok"),
    "tool_choice": ("none", {"tools": [TOOL]}, "ok"),
    "reasoning_effort": ("low", {}, "reasoning_effort"),
    "include_reasoning": (False, {}, "ok"),
    "parallel_tool_calls": (False, {}, "ok"),
    "best_of": (2, {}, "best_of"),
    "echo": (True, {}, "echo"),
    "add_generation_prompt": (False, {}, "ok"),
    "continue_final_message": (True, {"add_generation_prompt": False}, "ok"),
    "documents": ([{"title": "t", "text": "x"}], {}, "ok"),
    "chat_template": ("{{ 'x' }}", {}, "chat_template"),
    "chat_template_kwargs": ({"enable_thinking": False}, {}, "ok"),
    "mm_processor_kwargs": ({"a": 1}, {}, "mm_processor_kwargs"),
    "structural_tag": ('{"structures": []}', {}, "structural_tag"),
    "thinking_token_budget": (10, {}, "thinking_token_budget"),
}
COMPLETION = {
    **COMMON,
    "prompt": ("The class", {}, "ok"),
    "prompt_embeds": ("AAAA", {}, "prompt_embeds"),
    "best_of": (2, {"n": 2}, "ok"),
    "echo": (True, {}, "ok"),
    "logprobs": (2, {}, "ok"),
    "suffix": ("end", {}, "suffix"),
}


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> ServerProcess:
    with running_server(tiny_model_dir("llama"), "--served-model-name", "tiny", "--max-model-len", "256") as process:
        yield process


@pytest.mark.parametrize(("request_type", "fields"), [(ChatCompletionRequest, CHAT), (CompletionRequest, COMPLETION)])
def test_every_vllm_field_is_declared(request_type, fields):
    """A declared field is seen by the handler; an undeclared one would be dropped by the decoder."""
    declared = {field.name for field in msgspec.structs.fields(request_type)}
    assert set(fields) - declared == set()


def test_every_refused_field_is_in_the_table():
    refused = {param for table in (CHAT, COMMON) for _, _, param in table.values() if param != "ok"}
    assert refused - {"suffix"} <= set(UNSUPPORTED)


@pytest.mark.parametrize(
    ("path", "base", "fields"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, CHAT),
        ("/v1/completions", {"prompt": "The class"}, COMPLETION),
    ],
    ids=["chat", "completions"],
)
def test_each_field_is_honoured_or_a_400_naming_it(server, path, base, fields):
    failures = []
    for name, (value, needs, expected) in fields.items():
        body = {**base, "max_tokens": 3, **needs, name: value}
        response = server.request("POST", path, body)
        if expected == "ok":
            if response.status != 200:
                failures.append((name, response.status, response.body[:200]))
        else:
            param = response.json()["error"]["param"] if response.status == 400 else None
            if response.status != 400 or param != expected:
                failures.append((name, response.status, param))
    assert failures == []
