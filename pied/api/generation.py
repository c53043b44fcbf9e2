"""One API request in flight: its engine requests (``n`` per prompt), their text, timings and aborts.

Chat and text completions differ only in how they build prompts and shape their output; both run
a :class:`Generation`: ``async with generation.running()`` submits the engine requests (or raises
the 503 of a full queue or a dead engine) and, on the way out, aborts whatever has not finished
(the client went away, an error); inside, ``updates()`` yields each choice's :class:`ChoiceUpdate`
as deltas arrive.

Tracing: when the request's server span records (``pied.api.tracing``), the engine requests carry
its ``traceparent`` (the engine's spans join the request's trace) and the span gets the GenAI
semantic-convention attributes: the request's at submission, usage and finish reasons at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

import proto
from pied.api.errors import APIError
from pied.api.state import ServerState
from pied.engine_client import EngineDeadError, RequestStream
from pied.llm import prompt_request
from pied.metrics import RequestTiming
from pied.output_processor import ChoiceState, ChoiceUpdate
from workers.tracing import traceparent


@dataclass
class PromptInput:
    """One prompt of a request: its token ids, its text when known, and its sampling parameters
    (``max_tokens`` resolved for this prompt's length)."""

    token_ids: list[int]
    params: proto.SamplingParams
    text: str | None = None


@dataclass
class Choice:
    """A choice and what the frontend tracks about its engine request."""

    state: ChoiceState
    prompt_index: int
    timing: RequestTiming
    stream: RequestStream | None = None
    started: bool = False  # the engine sent a first delta (so it no longer counts as waiting)

    @property
    def finished(self) -> bool:
        return self.state.finished


@dataclass
class Generation:
    server: ServerState
    request_id: str
    prompts: Sequence[PromptInput]
    choices: list[Choice] = field(default_factory=list)
    # For latency metrics (TTFT, e2e): when the request arrived, before its prompt was rendered and
    # tokenized (the handler passes it); the engine's queue span starts at ``arrival_time`` instead.
    arrival: float = field(default_factory=time.monotonic)
    arrival_time: float = field(default_factory=time.time)  # wall clock, as the scheduler records it

    def __post_init__(self) -> None:
        self._closed = False
        # One engine message per prompt, for all its choices: its lists cross the wire once.
        self._messages: list[proto.AddRequest] = []
        span = trace.get_current_span()  # the request's server span, when tracing is on
        self._span = span if span.is_recording() else None
        trace_context = ""
        if self._span is not None:
            trace_context = traceparent(span.get_span_context())
            if self.prompts:
                self._span.set_attributes(self._request_attributes())
        for prompt_index, prompt in enumerate(self.prompts):
            # Engine ids are ``{request_id}-{prompt}-{choice}``; choice indexes run over all prompts.
            message = prompt_request(
                f"{self.request_id}-{prompt_index}",
                prompt.token_ids,
                prompt.params,
                trace_context=trace_context,
                arrival_time=self.arrival_time,
            )
            self._messages.append(message)
            for request in message.choices():
                index = len(self.choices)
                state = ChoiceState(
                    request.request_id, index, prompt.token_ids, request.params, self.server.tokenizer
                )
                self.choices.append(Choice(state, prompt_index, RequestTiming(self.arrival)))

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(prompt.token_ids) for prompt in self.prompts)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(choice.state.token_ids) for choice in self.choices)

    @property
    def num_cached_tokens(self) -> int:
        # Per prompt, as the engine reports it for the prompt's first choice.
        seen: set[int] = set()
        total = 0
        for choice in self.choices:
            if choice.prompt_index not in seen:
                seen.add(choice.prompt_index)
                total += choice.state.num_cached_tokens
        return total

    # ---------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Generation]:
        """Submit on entry; on exit (normal, error, or the client's disconnect cancelling the
        handler) abort whatever has not finished. Counts as in flight for draining meanwhile."""
        self.server.num_in_flight += 1
        try:
            self.submit()
            try:
                yield self
            finally:
                try:
                    await self.close()
                finally:  # even when a disconnect cancels the close
                    if self._span is not None:
                        self._record_response(self._span)
        finally:
            self.server.num_in_flight -= 1

    def submit(self) -> None:
        """Hand every engine request to the engine. Raises APIError 503 when the waiting queue is
        full or the engine is dead (nothing is left submitted then)."""
        server = self.server
        server.admit()
        choices = iter(self.choices)
        try:
            for message in self._messages:
                # NOTE: the streams first: zip stops at their end without taking one more choice.
                for stream, choice in zip(server.engine.add_choices(message), choices):
                    choice.stream = stream
                    server.num_waiting += 1
        except EngineDeadError as error:
            self._release_waiting()
            self._abort_later([c.state.request_id for c in self.choices if c.stream is not None])
            self._closed = True
            raise APIError(503, f"The engine is not available: {error}") from error

    async def updates(self) -> AsyncIterator[tuple[Choice, ChoiceUpdate]]:
        """Yield every choice's updates in arrival order until all choices are finished.

        Raises EngineDeadError if the engine dies on the way.
        """
        metrics = self.server.metrics
        deltas = self._deltas()
        try:
            async for choice, delta in deltas:
                if delta.phases is not None:
                    # The scheduler's phase timings, also from the ABORT delta that follows a stop
                    # string the API found itself (the choice is finished by then).
                    metrics.observe_phases(delta.phases, len(choice.state.token_ids) + len(delta.token_ids) // 4)
                if choice.finished:
                    continue  # the ABORT delta after a stop string we found ourselves
                if not choice.started:
                    choice.started = True
                    self.server.num_waiting -= 1
                update = choice.state.update(delta)
                now = time.monotonic()
                metrics.observe_tokens(
                    choice.timing,
                    len(update.token_ids),
                    len(choice.state.prompt_token_ids),
                    now,
                    choice.state.num_cached_tokens,
                )
                if update.finish_reason is not None:
                    self._observe_finish(choice, update.finish_reason, now)
                if update.abort_engine:
                    # A stop string ended the choice; the engine does not know, so free its blocks.
                    await self.server.engine.abort([choice.state.request_id])
                yield choice, update
                if all(c.finished for c in self.choices):
                    return
        finally:
            await deltas.aclose()

    async def close(self) -> None:
        """Abort every unfinished engine request (idempotent). Safe to call while being cancelled:
        the abort itself is shielded, so a disconnect still frees the request's blocks."""
        if self._closed:
            return
        self._closed = True
        self._release_waiting()
        unfinished = [choice for choice in self.choices if not choice.finished]
        if not unfinished:
            return
        now = time.monotonic()
        reason = "error" if self.server.engine.dead else "abort"
        for choice in unfinished:
            self._observe_finish(choice, reason, now)
        request_ids = [choice.state.request_id for choice in unfinished]
        if not self.server.engine.dead:
            await asyncio.shield(self._abort_later(request_ids))

    def _observe_finish(self, choice: Choice, reason: str, now: float) -> None:
        state = choice.state
        self.server.metrics.observe_finish(
            choice.timing, reason, now, len(state.prompt_token_ids), len(state.token_ids)
        )

    # ---------------------------------------------------------------- tracing

    def _request_attributes(self) -> dict[str, str | int | float | list[str]]:
        """GenAI request attributes (every prompt of a request shares its parameters)."""
        params = self.prompts[0].params
        attributes: dict[str, str | int | float | list[str]] = {
            "gen_ai.request.model": self.server.model_name,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
        }
        if params.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = params.max_tokens
        if params.top_k > 0:
            attributes["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        if params.presence_penalty:
            attributes["gen_ai.request.presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            attributes["gen_ai.request.frequency_penalty"] = params.frequency_penalty
        if params.stop:
            attributes["gen_ai.request.stop_sequences"] = list(params.stop)
        if params.n != 1:
            attributes["gen_ai.request.choice.count"] = params.n
        return attributes

    def _record_response(self, span: trace.Span) -> None:
        """GenAI response attributes, once the request has ended (finished, failed or aborted)."""
        unfinished = "error" if self.server.engine.dead else "abort"
        finish_reasons = [choice.state.finish_reason or unfinished for choice in self.choices]
        span.set_attributes(
            {
                "gen_ai.response.id": self.request_id,
                "gen_ai.response.model": self.server.model_name,
                "gen_ai.response.finish_reasons": finish_reasons,
                "gen_ai.usage.input_tokens": self.num_prompt_tokens,
                "gen_ai.usage.output_tokens": self.num_completion_tokens,
                # Prompt tokens found in the prefix cache (part of input_tokens, as the convention says).
                "gen_ai.usage.cache_read.input_tokens": self.num_cached_tokens,
            }
        )
        if "error" in finish_reasons:
            # The HTTP status may be 200 (a stream that had started): the span must still say so.
            span.set_status(Status(StatusCode.ERROR, "the engine failed the request"))

    # ---------------------------------------------------------------- internals

    def _release_waiting(self) -> None:
        for choice in self.choices:
            if choice.stream is not None and not choice.started:
                choice.started = True
                self.server.num_waiting -= 1

    def _abort_later(self, request_ids: list[str]) -> asyncio.Task[None]:
        """Abort in a task of its own that the server keeps a reference to, so cancelling the
        handler that asked cannot cancel the abort."""
        task = asyncio.ensure_future(self.server.engine.abort(request_ids))
        self.server.background_tasks.add(task)
        task.add_done_callback(self.server.background_tasks.discard)
        return task

    async def _deltas(self) -> AsyncIterator[tuple[Choice, proto.TokenDelta]]:
        """The deltas of every choice, merged in arrival order."""
        if len(self.choices) == 1:
            choice = self.choices[0]
            assert choice.stream is not None
            async for delta in choice.stream:
                yield choice, delta
            return
        queue: asyncio.Queue[tuple[Choice, proto.TokenDelta | Exception]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            assert choice.stream is not None
            try:
                async for delta in choice.stream:
                    queue.put_nowait((choice, delta))
            except Exception as error:  # noqa: BLE001 - re-raised by the consumer below
                queue.put_nowait((choice, error))

        tasks = [asyncio.create_task(pump(choice)) for choice in self.choices]
        try:
            while True:
                choice, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield choice, item
        finally:
            for task in tasks:
                task.cancel()
