"""``POST /v1/chat/completions``: render the conversation with the chat template, then generate."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from aiohttp import web

from pied.api import responses
from pied.api.body import read_json
from pied.api.chat_output import ChatOutputFormat
from pied.api.errors import bad_request
from pied.api.generation import Choice, Generation, PromptInput
from pied.api.params import check_request_limits, sampling_params
from pied.api.prompt_logprobs import prompt_logprobs_of, requested_prompt_logprobs
from pied.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeltaMessage,
)
from pied.api.request_fields import check_unsupported
from pied.api.state import ServerState
from pied.api.structured import check_tools, constrain, grammar_constraint, tool_choice_of
from pied.chat_template import ChatTemplateError
from pied.output_processor import ChoiceUpdate


def message_dicts(messages: list[ChatMessage], param: str = "messages") -> list[dict[str, Any]]:
    """The conversation as the plain dicts chat templates expect; content parts are joined text."""
    if not messages:
        raise bad_request("messages must contain at least one message.", param)
    result = []
    for i, message in enumerate(messages):
        content: Any = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"Content part type {part.type!r} is not supported; only text is.",
                        f"{param}[{i}].content[{j}].type",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None:  # an assistant turn of tool calls only: "" (templates concatenate it), as vLLM
            content = ""
        entry: dict[str, Any] = {"role": message.role, "content": content}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(message, key)
            if value is not None:
                entry[key] = value
        result.append(entry)
    return result


# Template variables a request may not set through chat_template_kwargs: the ones the API sets
# itself, and ``chat_template``, which would run a template the request supplies.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "add_generation_prompt", "continue_final_message", "tools", "chat_template"}
)


async def render_chat(
    server: ServerState,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> str:
    """The conversation as prompt text (the model's chat template, or the --chat-template override).

    Rendered on a thread: a template is untrusted code that may run until its deadline, and the
    event loop must keep serving every other request meanwhile."""
    if len(messages) > server.limits.max_messages:
        raise bad_request(
            f"A request may have at most {server.limits.max_messages} messages, got {len(messages)}.",
            "messages",
        )
    conversation = message_dicts(messages)
    if add_generation_prompt and continue_final_message:
        raise bad_request(
            "add_generation_prompt and continue_final_message cannot both be true.", "continue_final_message"
        )
    reserved = RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs or {})
    if reserved:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(sorted(reserved))}.", "chat_template_kwargs"
        )
    try:
        return await asyncio.to_thread(
            server.tokenizer.apply_chat_template,
            conversation,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except ChatTemplateError as error:
        raise bad_request(f"The chat template could not render these messages: {error}", "messages") from None


async def create_chat_completion(request: web.Request, server: ServerState) -> web.StreamResponse:
    body = await read_json(request, server, ChatCompletionRequest)
    arrival = time.monotonic()
    generation, output, num_top, num_prompt_top = await prepare_chat(
        server, body, responses.new_id("chatcmpl"), arrival
    )
    created = responses.now_seconds()
    async with generation.running():
        if body.stream:
            return await stream_response(request, server, generation, body, created, num_top, output)
        await responses.run_to_completion(generation)
        answer = full_response(server, generation, created, num_top, output)
        if num_prompt_top is not None:
            answer.prompt_logprobs = prompt_logprobs_of(server, generation, generation.choices[0], num_prompt_top)
        return web.Response(body=msgspec.json.encode(answer), content_type="application/json")


async def prepare_chat(
    server: ServerState, body: ChatCompletionRequest, request_id: str, arrival: float
) -> tuple[Generation, ChatOutputFormat, int, int | None]:
    """Check a chat request (the model's generation defaults filled in), render and encode its
    conversation: the generation to run (not yet submitted), how its output becomes a message, its
    number of top logprobs and of prompt logprobs (None: not asked). Shared by
    ``/v1/chat/completions`` and ``/v1/responses`` (an adapter over it).

    ``arrival`` (``time.monotonic()``) is when the request's body was read: its latency metrics
    count from there, rendering and tokenizing included, as the client sees them (and vLLM counts)."""
    body = server.generation_defaults.apply(body)
    server.check_available()
    server.check_model(body.model)
    check_request_limits(body, server.limits)  # before the template renders anything
    check_unsupported(body)
    check_tools(body.tools)
    tool_choice = tool_choice_of(body.tools, body.tool_choice, server.enable_auto_tool_choice)
    grammar = await grammar_constraint(body, body.tools, tool_choice)
    template_kwargs = dict(body.chat_template_kwargs or {})
    if body.documents is not None:
        template_kwargs.setdefault("documents", body.documents)
    prompt = await render_chat(
        server,
        body.messages,
        add_generation_prompt=body.add_generation_prompt is not False,
        continue_final_message=bool(body.continue_final_message),
        tools=body.tools,
        template_kwargs=template_kwargs,
    )
    token_ids = truncate_prompt(await server.encode(prompt, bool(body.add_special_tokens), "messages"), body)

    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    num_top = body.top_logprobs or 0
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = server.generation_defaults.max_tokens(max_tokens, len(token_ids), server.max_model_len)
    params = sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=num_top if body.logprobs else None,
        num_prompt_tokens=len(token_ids),
        max_model_len=server.max_model_len,
        max_logprobs=server.max_logprobs,
        prompt_param="messages",
        limits=server.limits,
        param_names={
            "logprobs": "top_logprobs",
            "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
        },
    )
    num_prompt_top = requested_prompt_logprobs(body, server.max_logprobs)
    if num_prompt_top is not None:
        params = msgspec.structs.replace(params, prompt_logprobs=num_prompt_top)
    params = await constrain(server, body, params, grammar)
    if tool_choice == "auto" and server.tool_call_parser is not None:
        # Tool-call markers ([TOOL_CALLS], <|python_tag|>, sometimes <tool_call>) are special tokens
        # that the detokenizer would drop before the parser sees them (vLLM's adjust_request).
        params = msgspec.structs.replace(params, skip_special_tokens=False)
    output = ChatOutputFormat(
        reasoning_parser=server.reasoning_parser,
        tool_call_parser=server.tool_call_parser,
        tool_choice=tool_choice,
        include_reasoning=body.include_reasoning is not False,
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )
    generation = Generation(server, request_id, [PromptInput(token_ids, params, prompt)], arrival=arrival)
    return generation, output, num_top, num_prompt_top


async def stream_response(
    request: web.Request,
    server: ServerState,
    generation: Generation,
    body: ChatCompletionRequest,
    created: int,
    num_top: int,
    output: ChatOutputFormat,
) -> web.StreamResponse:
    options = body.stream_options
    streams = {choice.state.index: output.stream() for choice in generation.choices}
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and bool(options and options.continuous_usage_stats)

    def chunk(choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        new = ChatCompletionChunk(generation.request_id, created, server.model_name, choices)
        return responses.add_usage(new, generation, include_usage, continuous)

    def chunk_for(choice: Choice, update: ChoiceUpdate) -> ChatCompletionChunk | None:
        # Tokens whose text is held back (a partial character, a possible stop string): no chunk.
        if not update.text and update.finish_reason is None and not update.logprobs:
            return None
        logprobs = None
        if update.logprobs is not None:
            logprobs = responses.chat_logprobs(server, update.token_ids, update.logprobs, num_top)
        delta, finish_reason = streams[choice.state.index].feed(update.text, update.finish_reason)
        if delta == DeltaMessage() and finish_reason is None and logprobs is None:
            return None  # all held back by a parser (a possible marker, a tool call)
        return chunk([ChatChunkChoice(choice.state.index, delta, logprobs, finish_reason, update.stop_reason)])

    def usage_chunk() -> ChatCompletionChunk:
        final = ChatCompletionChunk(generation.request_id, created, server.model_name, [])
        final.usage = responses.usage(generation)
        return final

    # The first chunk of each choice names the role, as OpenAI streams it.
    first = [
        chunk([ChatChunkChoice(c.state.index, DeltaMessage("assistant", ""))]) for c in generation.choices
    ]
    return await responses.run_stream(
        request,
        generation,
        first_chunks=first,
        chunk_for=chunk_for,
        usage_chunk=usage_chunk if include_usage else None,
    )


def truncate_prompt(token_ids: list[int], body: ChatCompletionRequest) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return token_ids
    if keep < 1:
        raise bad_request(f"truncate_prompt_tokens must be at least 1, got {keep}.", "truncate_prompt_tokens")
    return token_ids[-keep:]


def full_response(
    server: ServerState, generation: Generation, created: int, num_top: int, output: ChatOutputFormat
) -> ChatCompletionResponse:
    choices = []
    for choice in generation.choices:
        state = choice.state
        logprobs = None
        if state.logprobs is not None:
            logprobs = responses.chat_logprobs(server, state.token_ids, state.logprobs, num_top)
        message, finish_reason = output.message(state.text, state.finish_reason)
        choices.append(ChatChoice(state.index, message, logprobs, finish_reason, state.stop_reason))
    return ChatCompletionResponse(
        generation.request_id, created, server.model_name, choices, responses.usage(generation)
    )
