"""Offline library API, shaped like vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Union

import msgspec

import proto
from pied.default_model import with_default_model
from pied.output_processor import ChoiceState
from pied.outputs import CompletionOutput, RequestOutput
from pied.tokenizer import Tokenizer
from proto.config import EngineConfig

PromptType = Union[str, dict[str, Any]]


class PromptTooLongError(ValueError):
    """A prompt that leaves no room in the model's context."""


def check_prompt_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """vLLM's rule: the prompt plus the tokens asked for must fit in the context."""
    if num_prompt_tokens == 0:
        raise ValueError("The prompt is empty; give at least one token.")
    requested = num_prompt_tokens + (max_tokens or 0)
    if num_prompt_tokens >= max_model_len or requested > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{requested} tokens ({num_prompt_tokens} in the prompt, {max_tokens or 0} for the completion). "
            "Please reduce the length of the prompt or the completion."
        )


def engine_requests(
    request_id: str,
    prompt_token_ids: list[int],
    params: proto.SamplingParams,
    trace_context: str = "",
    arrival_time: float = 0.0,
) -> list[proto.AddRequest]:
    """Expand a request with ``n`` choices into ``n`` engine requests ``{request_id}-{i}``.

    Choice ``i`` of a seeded request uses ``seed + i`` so the choices differ but stay reproducible.
    """
    packed = proto.pack_i32(prompt_token_ids)
    requests = []
    for index in range(params.n):
        choice_params = msgspec.structs.replace(
            params, n=1, seed=None if params.seed is None else params.seed + index
        )
        requests.append(
            proto.AddRequest(f"{request_id}-{index}", packed, choice_params, arrival_time, trace_context)
        )
    return requests


class LLM:
    """Generate with a model folder in this process. Engine keyword arguments are ``EngineConfig``
    fields (vLLM's names: ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ...)."""

    def __init__(self, model: str = "", dtype: str = "auto", seed: int = 0, **engine_args: Any) -> None:
        unknown = set(engine_args) - EngineConfig.field_names()
        if unknown:
            raise TypeError(f"unknown engine arguments: {', '.join(sorted(unknown))}")
        self.config = with_default_model(EngineConfig(model=model, dtype=dtype, seed=seed, **engine_args)).validate()
        # Imported here: the daemon's frontend uses this module's helpers and must not load torch.
        from pied.inproc import EngineCore

        self.engine = EngineCore(self.config)  # first: it reports a broken model folder by file name
        self.tokenizer = Tokenizer.from_folder(self.config.resolved_model())
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def _prompt_token_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise TypeError("a prompt is a string or a dict with 'prompt' or 'prompt_token_ids'")

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: proto.SamplingParams | Sequence[proto.SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; results in prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = proto.SamplingParams()
        if isinstance(sampling_params, proto.SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")

        outputs: list[RequestOutput] = []
        choices: dict[str, ChoiceState] = {}
        for prompt, params in zip(prompts, sampling_params):
            params.validate(self.config.max_logprobs)
            if params.grammar is not None:
                from workers.grammar import grammar_of  # xgrammar loads only when a grammar is used

                grammar_of(params.grammar)  # a bad grammar is this call's ValueError, not the engine's
            text, token_ids = self._prompt_token_ids(prompt)
            check_prompt_length(len(token_ids), None, self.engine.max_model_len)
            request_id = str(next(self._request_counter))
            output = RequestOutput(request_id, text, token_ids)
            outputs.append(output)
            for index, request in enumerate(engine_requests(request_id, token_ids, params)):
                choices[request.request_id] = ChoiceState(
                    request.request_id, index, token_ids, request.params, self.tokenizer
                )
                for delta in self.engine.add_request(request):
                    choices[delta.request_id].update(delta)

        try:
            while self.engine.has_unfinished():
                to_abort = []
                for delta in self.engine.step():
                    if choices[delta.request_id].update(delta).abort_engine:
                        to_abort.append(delta.request_id)
                if to_abort:
                    self.engine.abort(to_abort)
        except BaseException:
            self.engine.abort(list(choices))
            raise

        by_request = {output.request_id: output for output in outputs}
        for choice in choices.values():
            output = by_request[choice.request_id.rsplit("-", 1)[0]]
            output.num_cached_tokens = choice.num_cached_tokens
            output.outputs.append(
                CompletionOutput(
                    index=choice.index,
                    text=choice.text,
                    token_ids=choice.token_ids,
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                    logprobs=choice.logprobs,
                    cumulative_logprob=choice.cumulative_logprob if choice.logprobs is not None else None,
                )
            )
        for output in outputs:
            output.outputs.sort(key=lambda c: c.index)
            output.finished = True
        return outputs

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: proto.SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        token_prompts: list[PromptType] = [
            {"prompt": p, "prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts
        ]
        return self.generate(token_prompts, sampling_params)
