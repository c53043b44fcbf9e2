"""Request and response bodies of the OpenAI-compatible API, as msgspec Structs.

Requests decode with msgspec (types are checked there; a wrong type is a 400 naming the field).
Unknown fields are ignored, as OpenAI does. Optional fields accept an explicit ``null`` because
many clients send one for "unset". Field names and defaults follow vLLM's server, including its
extensions (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``,
``ignore_eos``, ``skip_special_tokens``, ``include_stop_str_in_output``, ...).
"""

from __future__ import annotations

from typing import Any, Union

import msgspec
from msgspec import UNSET, UnsetType

# ---------------------------------------------------------------- requests


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: Union[bool, None] = False
    continuous_usage_stats: Union[bool, None] = False


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is supported."""

    type: str
    text: Union[str, None] = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Union[str, None] = None
    tool_calls: Union[list[dict[str, Any]], None] = None
    tool_call_id: Union[str, None] = None


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields chat and text completions share; ``None`` means the default."""

    model: Union[str, None] = None
    n: Union[int, None] = 1
    max_tokens: Union[int, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    top_k: Union[int, None] = None
    min_p: Union[float, None] = None
    seed: Union[int, None] = None
    presence_penalty: Union[float, None] = None
    frequency_penalty: Union[float, None] = None
    repetition_penalty: Union[float, None] = None
    min_tokens: Union[int, None] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Union[list[int], None] = None
    ignore_eos: Union[bool, None] = False
    skip_special_tokens: Union[bool, None] = True
    include_stop_str_in_output: Union[bool, None] = False
    logit_bias: Union[dict[str, float], None] = None
    stream: Union[bool, None] = False
    stream_options: Union[StreamOptions, None] = None
    user: Union[str, None] = None
    # Constrained output (pied.api.structured): grammars and token masks.
    response_format: Union[dict[str, Any], None] = None
    structured_outputs: Union[dict[str, Any], None] = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: Union[str, None] = None
    guided_choice: Union[list[str], None] = None
    guided_grammar: Union[str, None] = None
    guided_decoding_backend: Union[str, None] = None
    allowed_token_ids: Union[list[int], None] = None
    bad_words: Union[list[str], None] = None
    truncate_prompt_tokens: Union[int, None] = None
    # vLLM fields pied refuses unless "off" (pied.api.request_fields): declared so none is dropped.
    prompt_logprobs: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    spaces_between_special_tokens: Any = None
    priority: Any = None
    request_id: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    cache_salt: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    mm_processor_kwargs: Any = None
    structural_tag: Any = None
    guided_whitespace_pattern: Any = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Union[int, None] = None
    logprobs: Union[bool, None] = False
    top_logprobs: Union[int, None] = None
    tools: Union[list[dict[str, Any]], None] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Union[bool, None] = None
    include_reasoning: Union[bool, None] = None
    documents: Union[list[dict[str, Any]], None] = None
    chat_template: Any = None
    reasoning_effort: Any = None
    thinking_token_budget: Any = None
    echo: Any = None
    best_of: Any = None
    add_generation_prompt: Union[bool, None] = True
    continue_final_message: Union[bool, None] = False
    add_special_tokens: Union[bool, None] = False
    chat_template_kwargs: Union[dict[str, Any], None] = None


class CompletionRequest(SamplingFields, kw_only=True):
    """``prompt`` is a string, a list of strings, a list of token ids, or a list of those lists."""

    prompt: Union[str, list[Union[str, int, list[int]]]]
    # Unset: OpenAI's 16, unless the model's generation config gives max_new_tokens; null: the rest
    # of the context (or max_new_tokens).
    max_tokens: Union[int, None, msgspec.UnsetType] = msgspec.UNSET
    logprobs: Union[int, None] = None
    echo: Union[bool, None] = False
    suffix: Union[str, None] = None
    best_of: Union[int, None] = None
    add_special_tokens: Union[bool, None] = True
    prompt_embeds: Any = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """Either ``prompt`` (text) or ``messages`` (rendered with the chat template first)."""

    model: Union[str, None] = None
    prompt: Union[str, None] = None
    messages: Union[list[ChatMessage], None] = None
    add_special_tokens: Union[bool, None] = None  # default: True for a prompt, False for messages
    add_generation_prompt: Union[bool, None] = True
    continue_final_message: Union[bool, None] = False
    tools: Union[list[dict[str, Any]], None] = None
    chat_template_kwargs: Union[dict[str, Any], None] = None
    return_token_strs: Union[bool, None] = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: Union[str, None] = None
    tokens: list[int]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class UsageInfo(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Union[PromptTokensDetails, None] = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: Union[list[int], None] = None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: Union[list[int], None] = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(msgspec.Struct):
    content: Union[list[ChatTokenLogprob], None] = None


class ChatResponseMessage(msgspec.Struct):
    role: str = "assistant"
    content: Union[str, None] = None
    tool_calls: list[dict[str, Any]] = []
    reasoning_content: Union[str, None, UnsetType] = UNSET  # only with --reasoning-parser


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    logprobs: Union[ChatLogprobs, None] = None
    finish_reason: Union[str, None] = None
    stop_reason: Union[int, str, None] = None


class PromptLogprob(msgspec.Struct):
    """vLLM's ``Logprob`` of a prompt position's token (keyed by token id in a dict per position)."""

    logprob: float
    rank: Union[int, None] = None
    decoded_token: Union[str, None] = None


# Per prompt position (the first is null), token id -> its logprob; present only when asked for.
PromptLogprobs = Union[list[Union[dict[str, PromptLogprob], None]], None, UnsetType]


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    object: str = "chat.completion"
    system_fingerprint: Union[str, None] = None
    prompt_logprobs: PromptLogprobs = UNSET


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    """A streamed message delta: only the fields that changed."""

    role: Union[str, None] = None
    content: Union[str, None] = None
    reasoning_content: Union[str, None] = None
    tool_calls: Union[list[dict[str, Any]], None] = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: DeltaMessage
    logprobs: Union[ChatLogprobs, None] = None
    finish_reason: Union[str, None] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionChunk(msgspec.Struct):
    """``usage`` is absent unless the client asked for it with ``stream_options.include_usage``;
    then it is ``null`` on every chunk but the last one (OpenAI's rule)."""

    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Union[UsageInfo, None, UnsetType] = UNSET  # UNSET fields are never encoded


class CompletionLogprobs(msgspec.Struct):
    text_offset: list[int] = []
    token_logprobs: list[Union[float, None]] = []
    tokens: list[str] = []
    top_logprobs: list[Union[dict[str, float], None]] = []


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: Union[CompletionLogprobs, None] = None
    finish_reason: Union[str, None] = None
    stop_reason: Union[int, str, None] = None
    prompt_logprobs: PromptLogprobs = UNSET


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Union[UsageInfo, None] = None
    object: str = "text_completion"
    system_fingerprint: Union[str, None] = None


class CompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Union[UsageInfo, None, UnsetType] = UNSET


class ModelCard(msgspec.Struct):
    id: str
    created: int
    root: str
    max_model_len: int
    object: str = "model"
    owned_by: str = "pied"
    parent: Union[str, None] = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Union[list[str], None] = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


class VersionResponse(msgspec.Struct):
    version: str
