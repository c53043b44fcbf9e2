"""From a decoded request to the engine's SamplingParams, with OpenAI-shaped 400s naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import msgspec

import proto
from pied.api.errors import bad_request, from_decode_error
from pied.api.protocol import SamplingFields
from pied.llm import PromptTooLongError, check_prompt_length, out_of_vocabulary

T = TypeVar("T")

# Integers travel to the engine as msgpack (64 bits at most) and token ids as int32.
MAX_TOKEN_ID = 2**31 - 1
SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (``pied serve`` flags of the same names, which check each is at
    least 1). A request past a limit is a 400 naming the field, before it costs the engine anything."""

    max_n: int = 128  # OpenAI's limit on n; more would let one request flood the queue
    # Choices of one request: n times its number of prompts (each choice is an engine request).
    max_choices: int = 1024
    max_prompts: int = 256  # prompts in one /v1/completions request (a list prompt)
    max_messages: int = 1024  # messages of one chat request (each is rendered by the template)
    max_output_tokens: int | None = None  # None: the rest of the context
    max_prompt_tokens: int | None = None  # None: the context length
    # Every generated character is read by one automaton over the stop strings: their number and
    # total length bound its size (the matching itself is linear, pied.stop_matcher).
    max_stop_strings: int = 32
    max_stop_string_chars: int = 1024  # all the stop strings together
    # Stop token ids travel to the engine with every choice; after duplicates are removed.
    max_stop_token_ids: int = 256


DEFAULT_LIMITS = RequestLimits()


def decode_body(body: bytes, request_type: type[T]) -> T:
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.DecodeError as error:
        raise from_decode_error(error) from None
    except RecursionError:  # msgspec's own depth guard, e.g. 100k nested arrays
        raise bad_request("The request body is nested too deeply.") from None
    except UnicodeDecodeError as error:  # msgspec checks UTF-8 only inside strings, and raises this
        raise bad_request(
            f"The request body is not valid UTF-8: {error.reason} at byte {error.start}."
        ) from None


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The stop strings, each once (a repeated one would only cost matching work)."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(dict.fromkeys(stop))


def check_num_choices(num_prompts: int, n: int | None, limits: RequestLimits) -> None:
    """Checked before tokenizing: a list of many tiny prompts is cheap to send, dear to encode."""
    if num_prompts > limits.max_prompts:
        raise bad_request(
            f"A request may have at most {limits.max_prompts} prompts, got {num_prompts}.", "prompt"
        )
    num_choices = num_prompts * (1 if n is None else max(n, 1))
    if num_choices > limits.max_choices:
        raise bad_request(
            f"A request may have at most {limits.max_choices} choices (n times the number of prompts), "
            f"got {num_choices}.",
            "prompt",
        )


def check_stop_strings(stop: list[str], limits: RequestLimits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise bad_request(
            f"stop may have at most {limits.max_stop_strings} strings, got {len(stop)}.", "stop"
        )
    total = sum(map(len, stop))
    if total > limits.max_stop_string_chars:
        raise bad_request(
            f"stop strings may have at most {limits.max_stop_string_chars} characters in all, got {total}.",
            "stop",
        )


def check_request_limits(request: SamplingFields, limits: RequestLimits) -> None:
    """The limits a request's fields can be held to as soon as its body is decoded, before any
    tokenizing: each costs O(1) or one pass over a list the body size already bounds."""
    if request.n is not None and request.n > limits.max_n:
        raise bad_request(f"n must be at most {limits.max_n}, got {request.n}.", "n")
    if getattr(request, "stream_options", None) is not None and not getattr(request, "stream", False):
        raise bad_request("stream_options can only be given when stream is true.", "stream_options")  # as vLLM
    # Raw length first (O(1)): a body of millions of ids is refused before anything walks it.
    stop_token_ids = request.stop_token_ids or []
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise bad_request(
            f"stop_token_ids may have at most {limits.max_stop_token_ids} ids, got {len(stop_token_ids)}.",
            "stop_token_ids",
        )
    if isinstance(request.stop, list) and len(request.stop) > limits.max_stop_strings:
        raise bad_request(
            f"stop may have at most {limits.max_stop_strings} strings, got {len(request.stop)}.", "stop"
        )
    check_stop_strings(stop_strings(request.stop), limits)


def check_engine_integers(request: SamplingFields) -> None:
    """Integers the engine carries as fixed-width numbers must fit them (JSON has no bounds)."""
    if request.seed is not None and not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1]:
        raise bad_request(f"seed must be a 64-bit signed integer, got {request.seed}.", "seed")
    for token_id in request.stop_token_ids or []:
        if token_id > MAX_TOKEN_ID:
            raise bad_request(f"stop_token_ids must be token ids, got {token_id}.", "stop_token_ids")


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """Token ids (from the client or the tokenizer) must index the model's embedding table."""
    token_id = out_of_vocabulary(token_ids, vocab_size)
    if token_id is not None:
        raise bad_request(f"Token id {token_id} is out of vocabulary (size {vocab_size}).", param)


def sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    max_logprobs: int,
    prompt_param: str,
    param_names: dict[str, str] | None = None,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> proto.SamplingParams:
    """Build and validate one prompt's SamplingParams.

    ``max_tokens`` None means what is left of the context after the prompt (at most
    ``limits.max_output_tokens``). ``param_names`` maps SamplingParams names to the request's own
    (chat says ``max_completion_tokens``/``top_logprobs``).
    """
    names = param_names or {}
    max_tokens_param = names.get("max_tokens", "max_tokens")
    check_request_limits(request, limits)
    n = 1 if request.n is None else request.n
    stop = stop_strings(request.stop)
    if (
        max_tokens is not None
        and limits.max_output_tokens is not None
        and max_tokens > limits.max_output_tokens
    ):
        raise bad_request(
            f"{max_tokens_param} must be at most {limits.max_output_tokens}, got {max_tokens}.",
            max_tokens_param,
        )
    if limits.max_prompt_tokens is not None and num_prompt_tokens > limits.max_prompt_tokens:
        raise bad_request(
            f"The prompt has {num_prompt_tokens} tokens; this server takes at most {limits.max_prompt_tokens}.",
            prompt_param,
        )

    def default(value, fallback):
        return fallback if value is None else value

    check_engine_integers(request)
    params = proto.SamplingParams(
        n=n,
        temperature=default(request.temperature, 1.0),
        top_p=default(request.top_p, 1.0),
        # Any top_k past the vocabulary means "all tokens"; clamped so that it fits the wire.
        top_k=min(default(request.top_k, 0), MAX_TOKEN_ID),
        min_p=default(request.min_p, 0.0),
        seed=request.seed,
        presence_penalty=default(request.presence_penalty, 0.0),
        frequency_penalty=default(request.frequency_penalty, 0.0),
        repetition_penalty=default(request.repetition_penalty, 1.0),
        max_tokens=max_tokens,
        min_tokens=default(request.min_tokens, 0),
        stop=stop,
        stop_token_ids=list(dict.fromkeys(request.stop_token_ids or [])),  # each id once
        ignore_eos=bool(request.ignore_eos),
        logprobs=logprobs,
        skip_special_tokens=default(request.skip_special_tokens, True),
        include_stop_str_in_output=bool(request.include_stop_str_in_output),
    )
    validate(params, max_logprobs, names)
    try:
        check_prompt_length(num_prompt_tokens, max_tokens, max_model_len)
    except PromptTooLongError as error:
        fits = num_prompt_tokens < max_model_len
        raise bad_request(str(error), max_tokens_param if fits else prompt_param) from None
    except ValueError as error:  # an empty prompt
        raise bad_request(str(error), prompt_param) from None
    if max_tokens is None:
        rest = max_model_len - num_prompt_tokens
        if limits.max_output_tokens is not None:
            rest = min(rest, limits.max_output_tokens)
        params = msgspec.structs.replace(params, max_tokens=rest)
        validate(params, max_logprobs, names)  # min_tokens against the resolved max_tokens
    return params


def validate(params: proto.SamplingParams, max_logprobs: int, names: dict[str, str]) -> None:
    try:
        params.validate(max_logprobs)
    except ValueError as error:
        param = getattr(error, "param", None)
        raise bad_request(str(error), names.get(param, param) if param else None) from None
