"""Offline library API, shaped like vLLM's: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, Union

import msgspec

import proto
from pied.default_model import with_default_model
from pied.engine import Engine, SupervisorOptions, WorkerKind
from pied.engine_client import RequestStream
from pied.output_processor import ChoiceState
from pied.outputs import CompletionOutput, Logprob, RequestOutput
from pied.preflight import preflight
from pied.tokenizer import Tokenizer
from proto.config import EngineConfig
from workers.actor import new_event_loop

PromptType = Union[str, dict[str, Any]]
T = TypeVar("T")
IDLE_TIMEOUT_SECONDS = 30.0  # after the last token, for the scheduler's idle snapshot


class PromptTooLongError(ValueError):
    """A prompt that leaves no room in the model's context."""


def check_prompt_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """vLLM's rule: the prompt plus the tokens asked for must fit in the context."""
    if num_prompt_tokens == 0:
        raise ValueError("The prompt is empty; give at least one token.")
    requested = num_prompt_tokens + (max_tokens or 0)
    if num_prompt_tokens >= max_model_len and not max_tokens:
        # The prompt alone fills the context (vLLM's wording for input too long).
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens, which leaves no room for output. Please reduce the length "
            "of the prompt."
        )
    if num_prompt_tokens >= max_model_len or requested > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{requested} tokens ({num_prompt_tokens} in the prompt, {max_tokens or 0} for the completion). "
            "Please reduce the length of the prompt or the completion."
        )


def out_of_vocabulary(token_ids: Sequence[int], vocab_size: int) -> int | None:
    """The first id that does not index the model's embedding table (it would fail the engine),
    or None. min/max run in C: millions of ids cost milliseconds."""
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return None
    return next(t for t in token_ids if not 0 <= t < vocab_size)


def check_vocabulary(token_ids: Sequence[int], vocab_size: int, what: str) -> None:
    token_id = out_of_vocabulary(token_ids, vocab_size)
    if token_id is not None:
        raise ValueError(f"{what}: token id {token_id} is out of vocabulary (size {vocab_size}).")


def checked_params(params: proto.SamplingParams, vocab_size: int, max_logprobs: int) -> proto.SamplingParams:
    """``params`` validated as the engine will decode them: a field of the wrong type (a float
    seed, say) is a ValueError naming it here, where the scheduler would drop the request unseen,
    and token ids are in the vocabulary. A single stop string is a list of one, as vLLM takes it."""
    if isinstance(params.stop, str):
        params = msgspec.structs.replace(params, stop=[params.stop])
    with contextlib.suppress(TypeError):  # a wrong type: the decode below names its field
        params.validate(max_logprobs)  # values out of range, each named
    try:
        params = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=proto.SamplingParams)
    except (msgspec.ValidationError, OverflowError, TypeError) as error:
        raise ValueError(f"SamplingParams: {error}") from None
    params.validate(max_logprobs)
    check_vocabulary(params.allowed_token_ids, vocab_size, "allowed_token_ids")
    check_vocabulary(list(params.logit_bias), vocab_size, "logit_bias")
    return params


def prompt_request(
    request_id: str,
    prompt_token_ids: list[int],
    params: proto.SamplingParams,
    trace_context: str = "",
    arrival_time: float = 0.0,
) -> proto.AddRequest:
    """One engine message for a prompt and its ``n`` choices, whose ids are ``{request_id}-{i}``
    whatever ``n`` (``AddRequest.choices``; with ``n == 1`` the message is the choice itself)."""
    message_id = request_id if params.n > 1 else f"{request_id}-0"
    return proto.AddRequest(message_id, proto.pack_i32(prompt_token_ids), params, arrival_time, trace_context)


def engine_requests(
    request_id: str,
    prompt_token_ids: list[int],
    params: proto.SamplingParams,
    trace_context: str = "",
    arrival_time: float = 0.0,
) -> list[proto.AddRequest]:
    """Expand a request with ``n`` choices into ``n`` engine requests ``{request_id}-{i}``.

    Choice ``i`` of a seeded request uses ``seed + i`` so the choices differ but stay reproducible.
    Only choice 0 computes ``prompt_logprobs`` (the same for every choice of a prompt).
    """
    return prompt_request(request_id, prompt_token_ids, params, trace_context, arrival_time).choices()


class LLM:
    """Generate with a model folder in this process. Engine keyword arguments are ``EngineConfig``
    fields (vLLM's names: ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ...).

    The engine is the daemon's: the scheduler, executor and memory-manager actors, as threads of
    this process by default or as worker processes with ``workers="processes"`` (the default with
    ``tensor_parallel_size`` above 1: one process per rank), driven from a
    private event loop on a background thread. :meth:`shutdown` (also on leaving a ``with`` block,
    on garbage collection and at interpreter exit) stops them and frees every thread, socket and
    host memory segment.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "",
        dtype: str = "auto",
        seed: int = 0,
        workers: WorkerKind | None = None,
        supervisor_options: SupervisorOptions | None = None,
        **engine_args: Any,
    ) -> None:
        unknown = set(engine_args) - EngineConfig.field_names()
        if unknown:
            raise TypeError(f"unknown engine arguments: {', '.join(sorted(unknown))}")
        model = os.fspath(model)  # a folder given as a Path
        config = with_default_model(EngineConfig(model=model, dtype=dtype, seed=seed, **engine_args))
        # Every setting and the model folder, checked before any worker starts (ConfigError,
        # ModelFolderError); the workers get the plan it derived.
        self.config = preflight(config)
        self.tokenizer = Tokenizer.from_folder(self.config.resolved_model())
        self._request_counter = itertools.count()
        if workers is None:
            workers = "processes" if self.config.tensor_parallel_size > 1 else "threads"
        self._loop = EngineLoop(Engine(self.config, supervisor_options, workers=workers))
        self._finalizer = weakref.finalize(self, self._loop.close)
        # NOTE: at interpreter exit, before concurrent.futures refuses new work (its own hook is
        # registered the same way, earlier, and these hooks run last-registered first): stopping
        # the actors runs their on_stop work on executors.
        self._finalizer.atexit = False
        threading._register_atexit(self._finalizer)  # type: ignore[attr-defined]

    @property
    def engine(self) -> Engine:
        """The engine (its ``actor(name)`` reaches the workers' objects when they are threads)."""
        return self._loop.engine

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the engine and free what it holds. Idempotent."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _logprob_objects(self, entry: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        """One position's {token_id: (logprob, rank)} as vLLM's {token_id: Logprob}."""
        return {
            token_id: Logprob(logprob, rank, self.tokenizer.decode([token_id], skip_special_tokens=False))
            for token_id, (logprob, rank) in entry.items()
        }

    def _generated_logprobs(self, choice: ChoiceState) -> list[dict[int, Logprob]]:
        """The choice's {token_id: logprob} per token, with ranks: the sampled token's from the
        sampler, an alternative's its place among the top ones (which hold every more likely
        token)."""
        assert choice.logprobs is not None
        positions = []
        for entry, sampled_rank in zip(choice.logprobs, choice.sampled_ranks):
            values = list(entry.values())
            ranked = {
                token_id: (logprob, (sampled_rank or None) if i == 0 else 1 + sum(v > logprob for v in values))
                for i, (token_id, logprob) in enumerate(entry.items())
            }
            positions.append(self._logprob_objects(ranked))
        return positions

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
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; results in prompt order.
        (``use_tqdm``: taken as vLLM takes it; pied shows no progress bar.)"""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = proto.SamplingParams()
        if isinstance(sampling_params, proto.SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        if not self._finalizer.alive:
            raise RuntimeError("this LLM has been shut down")

        outputs: list[RequestOutput] = []
        choices: list[tuple[proto.AddRequest, ChoiceState]] = []
        vocab_size = self.engine.vocab_size
        for prompt, params in zip(prompts, sampling_params):
            # Everything is checked before the first request goes out: a bad one is this call's
            # ValueError, and no request of it runs.
            params = checked_params(params, vocab_size, self.config.max_logprobs)
            if params.grammar is not None:
                from workers.grammar import grammar_of  # xgrammar loads only when a grammar is used

                grammar_of(params.grammar)  # a bad grammar is this call's ValueError, not the engine's
            text, token_ids = self._prompt_token_ids(prompt)
            check_vocabulary(token_ids, vocab_size, "prompt_token_ids")
            check_prompt_length(len(token_ids), None, self.engine.max_model_len)
            request_id = str(next(self._request_counter))
            outputs.append(RequestOutput(request_id, text, token_ids))
            for index, request in enumerate(engine_requests(request_id, token_ids, params)):
                choice = ChoiceState(request.request_id, index, token_ids, request.params, self.tokenizer)
                choices.append((request, choice))
        self._loop.call(run_choices(self.engine, choices))

        by_request = {output.request_id: output for output in outputs}
        for _, choice in choices:
            output = by_request[choice.request_id.rsplit("-", 1)[0]]
            output.num_cached_tokens = choice.num_cached_tokens
            if choice.prompt_logprobs is not None:  # the prompt's first choice computes them
                output.prompt_logprobs = [
                    None if entry is None else self._logprob_objects(entry) for entry in choice.prompt_logprobs
                ]
            output.outputs.append(
                CompletionOutput(
                    index=choice.index,
                    text=choice.text,
                    token_ids=choice.token_ids,
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                    logprobs=None if choice.logprobs is None else self._generated_logprobs(choice),
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
        use_tqdm: bool = True,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate; the arguments
        as vLLM's ``LLM.chat`` takes them (``chat_template``: a template's text, or the name of
        one of the folder's; ``continue_final_message``: the last message is left open, for the
        model to go on with)."""
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(
                c,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                chat_template=chat_template,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            for c in conversations
        ]
        token_prompts: list[PromptType] = [
            {"prompt": p, "prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)} for p in prompts
        ]
        return self.generate(token_prompts, sampling_params)


async def run_choices(engine: Engine, choices: list[tuple[proto.AddRequest, ChoiceState]]) -> None:
    """Submit every engine request, feed each one's deltas to its choice, and return once all have
    finished and the engine is idle again (so its stats describe the finished batch)."""

    async def consume(stream: RequestStream, choice: ChoiceState) -> None:
        async for delta in stream:
            if choice.update(delta).abort_engine:
                await engine.abort([delta.request_id])  # a stop string: the rest is not wanted

    streams: list[tuple[RequestStream, ChoiceState]] = []
    try:
        for request, choice in choices:  # a request that fails to go out aborts those sent before it
            streams.append((engine.add_request(request), choice))
        await asyncio.gather(*(consume(stream, choice) for stream, choice in streams))
    except BaseException:
        await engine.abort([request.request_id for request, _ in choices])
        raise
    await engine.wait_idle(IDLE_TIMEOUT_SECONDS)


class EngineLoop:
    """An event loop on a daemon thread that owns the engine: the synchronous API's bridge.

    :meth:`call` runs a coroutine there and waits for it; :meth:`close` shuts the engine down, then
    stops the loop and joins the thread.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pied-llm-loop", daemon=True)
        self._thread.start()
        try:
            self.call(engine.start())
        except BaseException:
            self._stop_loop()
            raise

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted here (Ctrl-C): the coroutine's own cleanup (aborting its requests) runs.
            future.cancel()
            raise

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            if self._thread.is_alive():
                self.call(self.engine.shutdown())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()
