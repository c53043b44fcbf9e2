"""``POST /v1/completions``: one or more prompts (text or token ids), ``n`` choices each.

Choice ``index`` runs over every prompt's choices: prompt ``p``'s choice ``i`` is ``p * n + i``.
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from pied.api import responses
from pied.api.body import read_json
from pied.api.errors import bad_request
from pied.api.generation import Choice, Generation, PromptInput
from pied.api.params import check_num_choices, check_request_limits, check_token_ids, sampling_params
from pied.api.prompt_logprobs import (
    echo_logprobs,
    prompt_entries,
    prompt_logprobs_of,
    requested_prompt_logprobs,
)
from pied.api.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from pied.api.request_fields import check_unsupported
from pied.api.state import ServerState
from pied.api.structured import constrain, grammar_constraint
from pied.llm import check_prompt_length
from pied.output_processor import ChoiceUpdate


async def prompt_inputs(server: ServerState, body: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """Each prompt's token ids and text (None for token prompts, whose text is decoded on demand)."""
    prompt = body.prompt
    add_special_tokens = body.add_special_tokens is not False
    if isinstance(prompt, str):
        return [(await server.encode(prompt, add_special_tokens, "prompt"), prompt)]
    if not prompt:
        raise bad_request("prompt must not be empty.", "prompt")
    if not isinstance(prompt[0], int):
        check_num_choices(len(prompt), body.n, server.limits)
    kinds = {type(item) for item in prompt}
    if len(kinds) != 1:
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids or a list of those.", "prompt"
        )
    kind = kinds.pop()
    if kind is int:
        token_prompts = [prompt]
    elif kind is list:
        token_prompts = prompt
    else:
        texts: list[str] = prompt  # type: ignore[assignment]
        return list(zip(await server.encode_many(texts, add_special_tokens, "prompt"), texts))
    result: list[tuple[list[int], str | None]] = []
    for index, token_ids in enumerate(token_prompts):
        param = "prompt" if kind is int else f"prompt[{index}]"
        if len(token_ids) >= server.max_model_len:  # O(1), before the ids are walked
            try:
                check_prompt_length(len(token_ids), body.max_tokens, server.max_model_len)
            except ValueError as error:
                raise bad_request(str(error), param) from None
        check_token_ids(token_ids, server.vocab_size, param)
        result.append((list(token_ids), None))
    return result


DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's, for a completion request that gives none


def completion_defaults(server: ServerState, body: CompletionRequest) -> CompletionRequest:
    """The request with the model's generation defaults (pied.generation_config) where it left a
    field unset; an unset max_tokens is the model's max_new_tokens (per prompt), else 16."""
    body = server.generation_defaults.apply(body)
    if body.max_tokens is msgspec.UNSET:
        has_default = "max_tokens" in server.generation_defaults.values
        body = msgspec.structs.replace(body, max_tokens=None if has_default else DEFAULT_MAX_TOKENS)
    return body


async def create_completion(request: web.Request, server: ServerState) -> web.StreamResponse:
    body = completion_defaults(server, await read_json(request, server, CompletionRequest))
    arrival = time.monotonic()  # latency metrics count tokenizing too (see prepare_chat)
    server.check_available()
    server.check_model(body.model)
    check_request_limits(body, server.limits)  # before anything is tokenized
    check_unsupported(body, honoured=("echo", "best_of"))
    grammar = await grammar_constraint(body)
    if body.suffix is not None:
        raise bad_request("suffix is not supported.", "suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise bad_request("best_of is not supported (other than equal to n).", "best_of")
    num_prompt_top = requested_prompt_logprobs(body, server.max_logprobs)
    # echo with logprobs: the prompt's tokens get logprobs too, from the prompt logprobs (vLLM's way).
    echo_with_logprobs = bool(body.echo) and body.logprobs is not None
    if echo_with_logprobs and body.stream:
        raise bad_request("echo with logprobs is not available when stream is true.", "echo")
    engine_prompt_top = max(num_prompt_top or 0, body.logprobs or 0) if echo_with_logprobs else num_prompt_top
    # echo with max_tokens 0: the prompt back, with its logprobs when asked, and nothing generated,
    # as vLLM (and OpenAI's legacy API) answers it: how a text is scored. The engine runs one step.
    echo_only = bool(body.echo) and body.max_tokens == 0
    if echo_only and body.stream:
        raise bad_request("echo with max_tokens 0 is not available when stream is true.", "max_tokens")
    prompts = []
    inputs = await prompt_inputs(server, body)
    for index, (token_ids, text) in enumerate(inputs):
        if body.truncate_prompt_tokens is not None:
            if body.truncate_prompt_tokens < 1:
                raise bad_request("truncate_prompt_tokens must be at least 1.", "truncate_prompt_tokens")
            # NOTE: echo then shows the prompt as given; the model sees its last k tokens.
            token_ids = token_ids[-body.truncate_prompt_tokens :]
        params = sampling_params(
            body,
            max_tokens=1
            if echo_only
            else server.generation_defaults.max_tokens(body.max_tokens, len(token_ids), server.max_model_len),
            logprobs=body.logprobs,
            num_prompt_tokens=len(token_ids),
            max_model_len=server.max_model_len,
            max_logprobs=server.max_logprobs,
            prompt_param="prompt" if len(inputs) == 1 else f"prompt[{index}]",
            limits=server.limits,
        )
        if engine_prompt_top is not None:
            params = msgspec.structs.replace(params, prompt_logprobs=engine_prompt_top)
        params = await constrain(server, body, params, grammar)
        prompts.append(PromptInput(token_ids, params, text))
    if body.echo:  # the prompts' texts, decoded here (on a thread when long) rather than per choice
        for prompt in prompts:
            if prompt.text is None:
                prompt.text = await server.decode(prompt.token_ids, skip_special_tokens=False)
    generation = Generation(server, responses.new_id("cmpl"), prompts, arrival=arrival)
    created = responses.now_seconds()
    num_top = body.logprobs or 0
    async with generation.running():
        if body.stream:
            return await stream_response(request, server, generation, body, created, num_top)
        await responses.run_to_completion(generation)
        choices = []
        for choice in generation.choices:
            state = choice.state
            logprobs = None
            if state.logprobs is not None:
                logprobs = completion_choice_logprobs(
                    server, generation, choice, num_top, echo_with_logprobs, generated=not echo_only
                )
            text = echo_text(server, generation, choice, bool(body.echo))
            if echo_only:
                answer_choice = CompletionChoice(state.index, text, logprobs, "length", None)
            else:
                answer_choice = CompletionChoice(
                    state.index, text + state.text, logprobs, state.finish_reason, state.stop_reason
                )
            if num_prompt_top is not None:
                answer_choice.prompt_logprobs = prompt_logprobs_of(server, generation, choice, num_prompt_top)
            choices.append(answer_choice)
        usage = responses.usage(generation)
        if echo_only:  # the step the engine ran generated nothing the answer shows
            usage.completion_tokens, usage.total_tokens = 0, usage.prompt_tokens
        answer = CompletionResponse(generation.request_id, created, server.model_name, choices, usage)
        return web.Response(body=msgspec.json.encode(answer), content_type="application/json")


def completion_choice_logprobs(
    server: ServerState, generation: Generation, choice: Choice, num_top: int, echo: bool, generated: bool = True
) -> CompletionLogprobs:
    """The choice's logprobs: of its generated tokens (unless not ``generated``: echo without
    generation), after the echoed prompt's when ``echo``."""
    state = choice.state
    assert state.logprobs is not None
    if not echo:
        return responses.completion_logprobs(server, state.token_ids, state.logprobs, num_top, 0)
    prompt_token_ids = generation.prompts[choice.prompt_index].token_ids
    entries = prompt_entries(generation, choice) or [None] * len(prompt_token_ids)
    logprobs = echo_logprobs(server, prompt_token_ids, entries, num_top)
    if not generated:
        return logprobs
    offset = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])) if logprobs.tokens else 0
    generated = responses.completion_logprobs(server, state.token_ids, state.logprobs, num_top, offset)
    logprobs.tokens += generated.tokens
    logprobs.token_logprobs += generated.token_logprobs
    logprobs.top_logprobs += generated.top_logprobs
    logprobs.text_offset += generated.text_offset
    return logprobs


def echo_text(server: ServerState, generation: Generation, choice: Choice, echo: bool) -> str:
    """The prompt's text when ``echo`` is set (decoded once for a token prompt), else ""."""
    if not echo:
        return ""
    prompt = generation.prompts[choice.prompt_index]
    if prompt.text is None:
        prompt.text = server.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    return prompt.text


async def stream_response(
    request: web.Request,
    server: ServerState,
    generation: Generation,
    body: CompletionRequest,
    created: int,
    num_top: int,
) -> web.StreamResponse:
    options = body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and bool(options and options.continuous_usage_stats)
    text_offsets = [0] * len(generation.choices)  # where each choice's next token's text starts

    def chunk(choice_chunk: CompletionChoice) -> CompletionChunk:
        new = CompletionChunk(generation.request_id, created, server.model_name, [choice_chunk])
        return responses.add_usage(new, generation, include_usage, continuous)

    def chunk_for(choice: Choice, update: ChoiceUpdate) -> CompletionChunk | None:
        # Tokens whose text is held back (a partial character, a possible stop string): no chunk.
        if not update.text and update.finish_reason is None and not update.logprobs:
            return None
        logprobs = None
        index = choice.state.index
        if update.logprobs is not None:
            logprobs = responses.completion_logprobs(
                server, update.token_ids, update.logprobs, num_top, text_offsets[index]
            )
            text_offsets[index] += sum(len(token) for token in logprobs.tokens)
        return chunk(CompletionChoice(index, update.text, logprobs, update.finish_reason, update.stop_reason))

    def usage_chunk() -> CompletionChunk:
        final = CompletionChunk(generation.request_id, created, server.model_name, [])
        final.usage = responses.usage(generation)
        return final

    # With echo, each choice's stream starts with its prompt, as vLLM streams it.
    first = []
    if body.echo:
        first = [
            chunk(CompletionChoice(c.state.index, echo_text(server, generation, c, True)))
            for c in generation.choices
        ]
    return await responses.run_stream(
        request,
        generation,
        first_chunks=first,
        chunk_for=chunk_for,
        usage_chunk=usage_chunk if include_usage else None,
    )
