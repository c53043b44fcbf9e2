"""What the API handlers share: the engine, the tokenizer, the served model, admission counters."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Any

from pied.api.errors import APIError
from pied.api.params import DEFAULT_LIMITS, RequestLimits
from pied.engine_client import EngineClient
from pied.metrics import ServerMetrics
from pied.tokenizer import Tokenizer

THREAD_ENCODE_CHARS = 20_000  # about 5k tokens: a few milliseconds of encoding


@dataclass
class ServerState:
    engine: EngineClient
    tokenizer: Tokenizer
    model_name: str
    model_root: str
    max_model_len: int
    vocab_size: int = 0  # the model's (0: take the tokenizer's); client token ids must be below it
    max_logprobs: int = 20
    max_queued_requests: int | None = None
    limits: RequestLimits = DEFAULT_LIMITS
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # a name in pied.api.tool_parsers.TOOL_PARSERS
    reasoning_parser: str | None = None  # a name in pied.api.reasoning.REASONING_PARSERS
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    # Engine requests submitted that have not produced their first delta yet: the frontend's exact
    # view of the waiting queue (the engine's own count lags by up to a step).
    num_waiting: int = 0
    num_in_flight: int = 0  # generation requests being answered (draining waits for 0)
    background_tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Logprob token strings are decoded one id at a time; the same ids recur constantly.
        self.token_text = functools.lru_cache(maxsize=65536)(self._token_text)
        if not self.vocab_size:
            self.vocab_size = self.tokenizer.vocab_size

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of a prompt. A long one is encoded on a thread (the tokenizer releases the GIL)
        so that it does not stall every stream this loop is serving."""
        if len(text) < THREAD_ENCODE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_available(self) -> None:
        if self.engine.dead:
            raise APIError(503, "The engine is dead; the server is shutting down.")
        if self.draining:
            raise APIError(503, "The server is shutting down and takes no new requests.")

    def check_model(self, model: str | None) -> None:
        # vLLM accepts a request without ``model``; a wrong one is a 404.
        if model is not None and model != self.model_name:
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
