"""What the API handlers share: the engine, the tokenizer, the served model, admission counters."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pied.api.errors import APIError
from pied.api.params import DEFAULT_LIMITS, RequestLimits, check_token_ids
from pied.engine_client import EngineClient
from pied.generation_config import GenerationDefaults
from pied.metrics import ServerMetrics
from pied.tokenizer import Tokenizer

# Past these sizes tokenizer work goes to a thread (about a millisecond of work below them).
# NOTE: the thread calls the tokenizer's batch methods: its single encode/decode hold the GIL.
THREAD_ENCODE_CHARS = 4_000
THREAD_DECODE_TOKENS = 4_000
RETRY_AFTER_SECONDS = 1  # a 429's Retry-After: requests here last seconds, not minutes


@dataclass
class ServerState:
    engine: EngineClient
    tokenizer: Tokenizer
    served_model_names: tuple[str, ...]  # --served-model-name: every one is accepted, the first answers
    model_root: str
    max_model_len: int
    vocab_size: int = 0  # the model's (0: take the tokenizer's); client token ids must be below it
    max_logprobs: int = 20
    max_queued_requests: int | None = None
    # HTTP requests admitted at once (generation, tokenize, detokenize; running or queued), counted
    # before the body is read: past it a 429. None: no bound.
    max_admitted_requests: int | None = 256
    body_timeout: float = 30.0  # seconds a request body may take to arrive (408 past it)
    write_timeout: float = 30.0  # seconds a stream write may wait on a client that does not read
    limits: RequestLimits = DEFAULT_LIMITS
    metrics: ServerMetrics = field(init=False)  # labelled with model_name, built in __post_init__
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # a name in pied.api.tool_parsers.TOOL_PARSERS
    reasoning_parser: str | None = None  # a name in pied.api.reasoning.REASONING_PARSERS
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    # Engine requests submitted that have not produced their first delta yet: the frontend's exact
    # view of the waiting queue (the engine's own count lags by up to a step).
    num_waiting: int = 0
    num_in_flight: int = 0  # generation requests being answered (draining waits for 0)
    num_admitted: int = 0  # requests past the admission bound's check, not answered yet
    background_tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def model_name(self) -> str:
        """The name responses carry (vLLM: the first served model name)."""
        return self.served_model_names[0]

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("a server needs at least one served model name.")
        # Logprob token strings are decoded one id at a time; the same ids recur constantly.
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)
        if not self.vocab_size:
            self.vocab_size = self.tokenizer.vocab_size
        self.metrics = ServerMetrics(self.model_name, self.max_model_len)

    async def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of a prompt, checked against the model's vocabulary (an added token past the
        embeddings is a 400 naming ``param``). A long prompt is encoded on a thread so that it
        does not stall every stream this loop is serving."""
        if len(text) < THREAD_ENCODE_CHARS:
            token_ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        else:
            (token_ids,) = await asyncio.to_thread(self.tokenizer.encode_batch, [text], add_special_tokens)
        check_token_ids(token_ids, self.vocab_size, param)
        return token_ids

    async def encode_many(self, texts: list[str], add_special_tokens: bool, param: str) -> list[list[int]]:
        """:meth:`encode` of many prompts, in one batch on a thread when they are long together."""
        if sum(map(len, texts)) < THREAD_ENCODE_CHARS:
            results = [self.tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in texts]
        else:
            results = await asyncio.to_thread(self.tokenizer.encode_batch, texts, add_special_tokens)
        for index, token_ids in enumerate(results):
            check_token_ids(token_ids, self.vocab_size, f"{param}[{index}]")
        return results

    async def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        """Text of ``token_ids``; a long list is decoded on a thread."""
        if len(token_ids) < THREAD_DECODE_TOKENS:
            return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        (text,) = await asyncio.to_thread(self.tokenizer.decode_batch, [token_ids], skip_special_tokens)
        return text

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_available(self) -> None:
        if self.engine.dead:
            raise APIError(503, "The engine is dead; the server is shutting down.")
        if self.draining:
            raise APIError(503, "The server is shutting down and takes no new requests.")

    def check_model(self, model: str | None) -> None:
        # vLLM accepts a request without ``model``; a wrong one is a 404.
        if model is not None and model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model")

    def admit(self) -> None:
        """Refuse new work while the waiting queue holds ``max_queued_requests`` engine requests."""
        self.check_available()
        limit = self.max_queued_requests
        if limit is None:
            return
        waiting = max(self.num_waiting, self.engine.stats().num_waiting)
        if waiting >= limit:
            raise APIError(
                503,
                f"The server's waiting queue is full ({waiting} requests waiting, limit {limit}); retry later.",
            )

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of the ``max_admitted_requests`` places while a request is answered; raise the
        429 (with ``Retry-After``) when none is left. Taken before the body is read, so a flood of
        large bodies costs at most the bound times the body limit."""
        limit = self.max_admitted_requests
        if limit is not None and self.num_admitted >= limit:
            raise APIError(
                429,
                f"The server is answering {self.num_admitted} requests, its limit; retry later.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.num_admitted += 1
        try:
            yield
        finally:
            self.num_admitted -= 1
