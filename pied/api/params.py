"""From a decoded request to the engine's SamplingParams, with OpenAI-shaped 400s naming the field."""

from __future__ import annotations

from typing import TypeVar

import msgspec

import proto
from pied.api.errors import bad_request, from_decode_error
from pied.api.protocol import SamplingFields
from pied.llm import PromptTooLongError, check_prompt_length

T = TypeVar("T")

MAX_CHOICES = 128  # OpenAI's limit on n; more would let one request flood the queue


def decode_body(body: bytes, request_type: type[T]) -> T:
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.DecodeError as error:
        raise from_decode_error(error) from None


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """Token ids from the client must index the embedding table; a bad one would fail the engine."""
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
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
) -> proto.SamplingParams:
    """Build and validate one prompt's SamplingParams.

    ``max_tokens`` None means what is left of the context after the prompt. ``param_names`` maps
    SamplingParams names to the request's own (chat says ``max_completion_tokens``/``top_logprobs``).
    """
    names = param_names or {}
    if request.logit_bias:
        raise bad_request("logit_bias is not supported.", "logit_bias")
    n = 1 if request.n is None else request.n
    if n > MAX_CHOICES:
        raise bad_request(f"n must be at most {MAX_CHOICES}, got {n}.", "n")

    def default(value, fallback):
        return fallback if value is None else value

    params = proto.SamplingParams(
        n=n,
        temperature=default(request.temperature, 1.0),
        top_p=default(request.top_p, 1.0),
        top_k=default(request.top_k, 0),
        min_p=default(request.min_p, 0.0),
        seed=request.seed,
        presence_penalty=default(request.presence_penalty, 0.0),
        frequency_penalty=default(request.frequency_penalty, 0.0),
        repetition_penalty=default(request.repetition_penalty, 1.0),
        max_tokens=max_tokens,
        min_tokens=default(request.min_tokens, 0),
        stop=stop_strings(request.stop),
        stop_token_ids=list(request.stop_token_ids or []),
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
        raise bad_request(
            str(error), names.get("max_tokens", "max_tokens") if fits else prompt_param
        ) from None
    except ValueError as error:  # an empty prompt
        raise bad_request(str(error), prompt_param) from None
    if max_tokens is None:
        params = msgspec.structs.replace(params, max_tokens=max_model_len - num_prompt_tokens)
        validate(params, max_logprobs, names)  # min_tokens against the resolved max_tokens
    return params


def validate(params: proto.SamplingParams, max_logprobs: int, names: dict[str, str]) -> None:
    try:
        params.validate(max_logprobs)
    except ValueError as error:
        param = getattr(error, "param", None)
        raise bad_request(str(error), names.get(param, param) if param else None) from None
