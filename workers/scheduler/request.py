"""Per-request state on the scheduler: tokens, progress through the cache, blocks, and how it ended."""

from __future__ import annotations

import enum
import sys
import time
from array import array

from proto import AddRequest, FinishReason, PromptLogprobs, SamplingParams

# Token ids and block tables are kept as ``array('i')`` so a step packs them with a memcpy: the wire
# format is little-endian int32 (proto.pack_i32), which is array('i')'s native layout here.
if sys.byteorder != "little" or array("i").itemsize != 4:
    raise ImportError("pied's scheduler packs int32 arrays natively and needs a little-endian platform.")


class RequestStatus(enum.IntEnum):
    WAITING = 0  # queued: never run yet, or preempted and waiting to be recomputed
    RUNNING = 1  # holds blocks; scheduled in every step the token budget allows
    FINISHED = 2
    SWAPPED = 3  # preempted with its computed blocks copied to host blocks (kv_policy swap)


class Request:
    """One request as the scheduler sees it. Only the scheduler mutates it.

    ``token_ids`` holds the prompt followed by the output so far. ``num_computed_tokens`` of them
    have their K/V in the cache, in the blocks of ``block_table`` (block ``j`` holds positions
    ``[j * block_size, (j + 1) * block_size)``; device and host block ids may mix).
    """

    __slots__ = (
        "request_id",
        "token_ids",
        "num_prompt_tokens",
        "packed_prompt_token_ids",
        "params",
        "stop_token_ids",
        "max_num_tokens",
        "block_table",
        "num_computed_tokens",
        "status",
        "arrival_time",
        "trace_context",
        "finish_reason",
        "stop_token_id",
        "error",
        "executor_has_state",
        "block_hashes",
        "num_registered_blocks",
        "num_cached_tokens",
        "pending_prompt_logprobs",
        "queued_time",
        "scheduled_time",
        "first_token_time",
    )

    def __init__(
        self,
        request_id: str,
        packed_prompt_token_ids: bytes,
        params: SamplingParams,
        *,
        eos_token_ids: frozenset[int] | set[int],
        max_model_len: int,
        arrival_time: float = 0.0,
        trace_context: str = "",
    ) -> None:
        self.request_id = request_id
        self.token_ids = array("i")
        self.token_ids.frombytes(packed_prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.packed_prompt_token_ids = packed_prompt_token_ids
        self.params = params
        # Derived once so the per-token stop check is one set lookup and one comparison.
        stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_token_ids |= eos_token_ids
        self.stop_token_ids = frozenset(stop_token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len
        self.max_num_tokens = min(self.num_prompt_tokens + max_tokens, max_model_len)
        self.block_table = array("i")
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.arrival_time = arrival_time or time.time()
        self.trace_context = trace_context
        self.finish_reason: FinishReason | None = None
        self.stop_token_id = -1
        self.error = ""
        # Whether the executor got this request's NewRequestData (sent once, kept across preemption).
        self.executor_has_state = False
        # Prefix caching: the names of its full blocks so far (they depend on the tokens only, so they
        # survive preemption), how many blocks of ``block_table`` were offered to the cache (hits
        # included), and the prompt tokens its first admission found cached (reported in usage).
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0
        # prompt_logprobs computed and not yet sent: they go out with the request's next delta.
        self.pending_prompt_logprobs: list[PromptLogprobs] = []
        # Phase timestamps on this process's monotonic clock (0: not yet), for the final delta.
        self.queued_time = time.monotonic()
        self.scheduled_time = 0.0  # first scheduled (kept across preemption, as vLLM's queue time)
        self.first_token_time = 0.0

    @classmethod
    def from_message(
        cls, msg: AddRequest, eos_token_ids: frozenset[int] | set[int], max_model_len: int
    ) -> Request:
        return cls(
            msg.request_id,
            msg.prompt_token_ids,
            msg.params,
            eos_token_ids=eos_token_ids,
            max_model_len=max_model_len,
            arrival_time=msg.arrival_time,
            trace_context=msg.trace_context,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def reads_prefix_cache(self) -> bool:
        """False while the request still owes prompt logprobs: their positions must be computed,
        so it starts from scratch rather than after cached blocks (as vLLM does)."""
        return self.params.prompt_logprobs is None or self.num_output_tokens > 0

    def take_prompt_logprobs(self) -> list[PromptLogprobs]:
        taken, self.pending_prompt_logprobs = self.pending_prompt_logprobs, []
        return taken

    @property
    def prompt_token_ids(self) -> array:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> array:
        return self.token_ids[self.num_prompt_tokens :]

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_prompt_tokens}+"
            f"{self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
