"""Every message pied's processes exchange. msgspec Structs only; this package imports nothing of ours.

Wire rules (see DESIGN.md "Messages"):
- Hot-path messages are ``array_like``, ``omit_defaults``, ``gc=False``: field order is the wire
  format, so new fields go last and have defaults.
- Token ids, positions and block tables travel as packed little-endian arrays in ``bytes`` fields
  (``int32`` unless a field says otherwise), built with :func:`pack_i32` and read with
  :func:`unpack_i32` (zero-copy ``np.frombuffer``).
- Every request-scoped message carries ``trace_context``: the W3C ``traceparent`` of the span it
  belongs to ("" when there is none).
"""

from __future__ import annotations

import enum
import math
from typing import Union

import msgspec
import numpy as np

HOT = dict(array_like=True, omit_defaults=True, gc=False)


def pack_i32(values) -> bytes:
    """Pack a sequence of ints (list or ndarray) as little-endian int32 bytes."""
    return np.ascontiguousarray(values, dtype="<i4").tobytes()


def unpack_i32(data: bytes) -> np.ndarray:
    """A read-only int32 view of bytes made by :func:`pack_i32` (no copy)."""
    return np.frombuffer(data, dtype="<i4")


def pack_f32(values) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def unpack_f32(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


class FinishReason(enum.IntEnum):
    """Why a request ended. ``str()`` gives the OpenAI name."""

    STOP = 0  # eos, a stop token id or a stop string
    LENGTH = 1  # max_tokens or the model's context length
    ABORT = 2  # aborted by the caller (disconnect, abort())
    ERROR = 3  # the engine failed the request

    def __str__(self) -> str:
        return ("stop", "length", "abort", "error")[self.value]


class GrammarKind(enum.IntEnum):
    """What a :class:`GrammarConstraint`'s ``spec`` is."""

    JSON_SCHEMA = 0  # a JSON schema's text; "" means any JSON value (response_format json_object)
    REGEX = 1  # a regular expression the whole output matches
    EBNF = 2  # an EBNF grammar (xgrammar's GBNF dialect, root rule ``root``)


class GrammarConstraint(msgspec.Struct, array_like=True, frozen=True):
    """Structured output: the whole output must be a sentence of this grammar (then eos).

    The frontend checks that ``spec`` parses before it sends it; the executor compiles it against
    the model's vocabulary and masks every token the grammar does not allow next."""

    kind: GrammarKind
    spec: str


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to sample one request, shaped like vLLM's ``SamplingParams``.

    Invariants (checked by :meth:`validate`): ``temperature >= 0`` (0 means greedy);
    ``0 < top_p <= 1``; ``top_k`` of 0 or -1 disables it; ``0 <= min_p <= 1``;
    ``repetition_penalty > 0``; ``max_tokens`` None means "until the context is full";
    ``min_tokens <= max_tokens``; ``logprobs`` None means none, otherwise the number of top
    alternatives (0 returns only the sampled token's logprob). ``allowed_token_ids`` empty means
    every token; ``bad_words_token_ids`` are token sequences whose last token is masked when the
    output ends with the rest (the frontend tokenizes vLLM's ``bad_words``); ``grammar`` None means
    unconstrained. ``prompt_logprobs`` None means none, otherwise the number of top alternatives
    returned with each prompt token's own logprob (:class:`PromptLogprobs`). ``logit_bias`` adds
    its value to the logit of its token id before sampling (OpenAI's, as vLLM applies it: with
    min_tokens, before the penalties; greedy rows too).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Union[int, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: Union[int, None] = 16
    min_tokens: int = 0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: Union[int, None] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] = []
    bad_words_token_ids: list[list[int]] = []
    grammar: Union[GrammarConstraint, None] = None
    prompt_logprobs: Union[int, None] = None
    logit_bias: dict[int, float] = {}

    def validate(self, max_logprobs: int = 20) -> None:
        """Raise ``ValueError(message)`` naming the offending parameter; ``.param`` is set on it."""

        def bad(param: str, message: str):
            error = ValueError(message)
            error.param = param  # type: ignore[attr-defined]
            raise error

        if self.n < 1:
            bad("n", f"n must be at least 1, got {self.n}.")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", f"temperature must be a non-negative number, got {self.temperature}.")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed", f"seed must fit in 64 bits, got {self.seed}.")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            bad("top_k", f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}.")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not 0 < self.repetition_penalty <= 2:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad("min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens}).")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            bad("logprobs", f"logprobs must be in [0, {max_logprobs}], got {self.logprobs}.")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= max_logprobs:
            bad("prompt_logprobs", f"prompt_logprobs must be in [0, {max_logprobs}], got {self.prompt_logprobs}.")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop", "stop strings must be non-empty strings.")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "stop_token_ids must be non-negative token ids.")
        if any(t < 0 for t in self.allowed_token_ids):
            bad("allowed_token_ids", "allowed_token_ids must be non-negative token ids.")
        if any(not word or any(t < 0 for t in word) for word in self.bad_words_token_ids):
            bad("bad_words", "bad_words must be non-empty sequences of token ids.")
        if any(t < 0 for t in self.logit_bias) or not all(math.isfinite(b) for b in self.logit_bias.values()):
            bad("logit_bias", "logit_bias maps non-negative token ids to finite numbers.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------- frontend <-> scheduler


class AddRequest(msgspec.Struct, tag=True, **HOT):
    """A new request. ``prompt_token_ids`` is non-empty int32, already checked to fit the context.

    ``params.n > 1`` stands for n choices (:meth:`choices`), sent as one message so that the prompt
    and the parameter lists (stop_token_ids, allowed_token_ids, bad words) cross the wire once; the
    scheduler's actor expands it, and the scheduler itself sees ``n == 1`` only.
    """

    request_id: str
    prompt_token_ids: bytes
    params: SamplingParams
    arrival_time: float = 0.0
    trace_context: str = ""

    def choices(self) -> list[AddRequest]:
        """The ``n == 1`` requests this one stands for: itself when ``params.n == 1``, else
        ``{request_id}-{i}`` for ``i < n``, choice ``i`` seeded ``seed + i`` (reproducible, yet
        distinct), only choice 0 computing ``prompt_logprobs``. They share this request's prompt bytes
        and parameter lists: nothing is copied."""
        params = self.params
        if params.n == 1:
            return [self]
        return [
            AddRequest(
                f"{self.request_id}-{index}",
                self.prompt_token_ids,
                msgspec.structs.replace(
                    params,
                    n=1,
                    seed=None if params.seed is None else params.seed + index,
                    # The same for every choice of a prompt: computed once.
                    prompt_logprobs=params.prompt_logprobs if index == 0 else None,
                ),
                self.arrival_time,
                self.trace_context,
            )
            for index in range(params.n)
        ]


class AbortRequests(msgspec.Struct, tag=True, **HOT):
    """Drop these requests wherever they are; unknown ids are ignored. Their blocks are free
    before the next step is planned, and each gets a final delta with ``FinishReason.ABORT``."""

    request_ids: list[str]


class RequestPhases(msgspec.Struct, **HOT):
    """How long a request spent in each phase, on the scheduler's clock (so without the IPC hops):
    ``queue_seconds`` from its arrival at the scheduler to its first scheduling (kept across
    preemptions), ``prefill_seconds`` from then to its first token, ``decode_seconds`` from its
    first token to its end."""

    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float


class TokenDelta(msgspec.Struct, **HOT):
    """New output of one request since its previous delta.

    ``token_ids`` are int32 packed. ``finish_reason`` is set on the last delta of a request
    and only there; ``stop_token_id`` is the eos/stop token that ended it (-1 if none; the token is
    included in ``token_ids``). ``logprobs`` (when asked) has one entry per token in ``token_ids``.

    ``phases``: on the last delta of a request that produced a token (and only there), the
    scheduler's timings of its phases (None otherwise: one byte on the wire).
    """

    request_id: str
    token_ids: bytes
    finish_reason: Union[FinishReason, None] = None
    stop_token_id: int = -1
    num_prompt_tokens: int = 0
    logprobs: list[TokenLogprobs] = []
    num_cached_tokens: int = 0
    trace_context: str = ""
    error: str = ""
    # With the request's first output token (when it asked): the logprobs of its prompt tokens 1..P-1.
    prompt_logprobs: list[PromptLogprobs] = []
    phases: Union[RequestPhases, None] = None


class TokenDeltas(msgspec.Struct, tag=True, **HOT):
    """One step's deltas, for every request that produced output or finished in it."""

    deltas: list[TokenDelta]


class TokenLogprobs(msgspec.Struct, **HOT):
    """Logprob of one sampled token, its rank (1: the most likely; 0: not computed) and its ``k``
    best alternatives (int32 ids, float32 values, best first). Logprobs are of the model's
    distribution before any sampling transform."""

    logprob: float
    top_ids: bytes = b""
    top_logprobs: bytes = b""
    rank: int = 0


class PromptLogprobs(msgspec.Struct, **HOT):
    """Logprobs of a run of one request's prompt tokens, at prompt positions ``first_position ..
    first_position + n - 1`` (``first_position >= 1``: the first prompt token has no logprob), each
    the logprob of the prompt token there given the tokens before it, of the raw logits.

    ``token_logprobs`` (float32, n) and ``ranks`` (int32, n; 1 is the most likely token) are the
    prompt tokens'; ``top_ids`` (int32) and ``top_logprobs`` (float32) hold ``num_top`` alternatives
    per position, best first, position by position (``n * num_top`` each). A long prompt computed
    over several steps (chunked prefill) sends one run per step, in order, without gaps.
    """

    request_id: str
    first_position: int
    token_logprobs: bytes
    ranks: bytes
    num_top: int = 0
    top_ids: bytes = b""
    top_logprobs: bytes = b""

    @property
    def num_positions(self) -> int:
        return len(self.token_logprobs) // 4


# ---------------------------------------------------------------- scheduler <-> executor


class NewRequestData(msgspec.Struct, **HOT):
    """Sent to the executor the first time a request is scheduled (and only then), so it can keep
    per-request sampling state (generator, penalty counts) until the request is finished.
    ``trace_context``: the traceparent the executor parents this request's spans on."""

    request_id: str
    prompt_token_ids: bytes
    params: SamplingParams
    trace_context: str = ""


# In a StepPlan's ``token_ids`` (async scheduling): "the token this request sampled in the step
# before", which the scheduler did not have when it made the plan; the executor substitutes it.
PLACEHOLDER_TOKEN_ID = -1


class StepPlan(msgspec.Struct, tag=True, **HOT):
    """One forward pass. For the i-th scheduled request:

    - ``num_scheduled_tokens[i]`` tokens, ``token_ids`` concatenated in request order;
    - its first token sits at position ``start_positions[i]`` (tokens before it are in the cache);
    - ``block_tables``: its block ids concatenated, ``num_blocks[i]`` of them, covering every
      position up to ``start_positions[i] + num_scheduled_tokens[i]``;
    - ``sample[i]`` (uint8) is 1 when the last scheduled token is the request's last known token,
      so a new token is sampled after it.

    ``finished_request_ids``: requests whose executor state can be dropped (sent once).
    Block ids in ``[0, num_device_blocks)`` are device blocks.

    Async scheduling (``EngineConfig.async_scheduling``): the plan of step t+1 is made while step t
    runs, so a request that samples in step t and decodes in step t+1 has ``PLACEHOLDER_TOKEN_ID``
    as its token in t+1 (its only scheduled token, at the position after step t's); the executor,
    which runs plans in order, puts the token it sampled for that request in step t there.
    Placeholders appear in no other place and in no plan that follows a step that did not run.
    """

    step_id: int
    request_ids: list[str]
    num_scheduled_tokens: bytes
    token_ids: bytes
    start_positions: bytes
    num_blocks: bytes
    block_tables: bytes
    sample: bytes
    new_requests: list[NewRequestData] = []
    finished_request_ids: list[str] = []
    # Host memory (DESIGN.md "KV memory"). Block ids >= num_device_blocks in ``block_tables`` are
    # host blocks: the executor streams them layer by layer through its staging ring.
    # ``swap_out`` / ``swap_in``: int32 pairs (src, dst) of whole-block copies across tiers
    # (device -> host, host -> device), done before the forward pass, swap_out first, so a device
    # block freed by a swap-out may be reused by the same plan.
    swap_out: bytes = b""
    swap_in: bytes = b""


class StepResult(msgspec.Struct, tag=True, **HOT):
    """What a StepPlan produced: one sampled token (int32) per request with ``sample[i] == 1``,
    in plan order. ``logprobs`` is empty unless some request asked; then it has one entry per
    sampled token (``None`` for requests that did not ask). Times are seconds."""

    step_id: int
    sampled_token_ids: bytes
    logprobs: list[Union[TokenLogprobs, None]] = []
    forward_time: float = 0.0
    step_time: float = 0.0
    error: str = ""
    # Host streaming: distinct host blocks the step read, bytes moved host -> device (and back for
    # write-back and swaps), and the time compute waited for the copy engine (the stall).
    num_host_blocks: int = 0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    stall_time: float = 0.0
    layer_compute_time: float = 0.0  # mean per-layer compute time of this step
    # Seconds the copy engine was busy with this step's transfers (both directions; 0: no copies),
    # and the host -> device bandwidth (bytes/s) the executor measured at start (0: no host tier).
    copy_time: float = 0.0
    link_bandwidth: float = 0.0
    # Requests that asked for prompt_logprobs and computed prompt tokens in this step: one run each.
    prompt_logprobs: list[PromptLogprobs] = []
    # The staging ring the step ran with (``PrefetchCommand``): host blocks per step it serves and
    # layers loaded ahead (0: no ring).
    num_staging_blocks: int = 0
    prefetch_depth: int = 0


class RankStep(msgspec.Struct, tag=True, **HOT):
    """Executor rank ``rank`` (> 0) -> scheduler, after each step it ran under tensor parallelism:
    its own figures for step ``step_id`` (rank 0's travel on its StepResult), for ``/metrics`` only.
    The scheduler never waits for them, so they add no synchronization between the ranks or with the
    step loop. Each rank streams its own slice of the host blocks, so bytes and stalls are its own;
    fields as in StepResult."""

    step_id: int
    rank: int
    step_time: float = 0.0
    forward_time: float = 0.0
    stall_time: float = 0.0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    num_staging_blocks: int = 0


# ---------------------------------------------------------------- host memory (memory manager)


class HostSegmentInfo(msgspec.Struct, **HOT):
    """One host KV segment: ``num_blocks`` host blocks starting at host index ``first_block``
    (block id ``D + first_block``), backed by memfd ``fd`` of process ``pid`` (the memory manager),
    sealed at its size; a mapper asks the memory manager for the descriptor over the fd channel
    (SCM_RIGHTS, ``workers/fd_channel.py``), never through ``/proc``. ``(segment_id, fd)`` names
    one live segment. ``first_block == segment_id * blocks_per_segment``."""

    segment_id: int
    pid: int
    fd: int
    first_block: int
    num_blocks: int


class HostLease(msgspec.Struct, tag=True, **HOT):
    """Memory manager -> scheduler: the host lease is now ``lease`` blocks (ids ``[D, D + lease)``).

    ``attach``: new segments backing the lease; the scheduler forwards them to the executor
    (``SegmentUpdate``) before any plan that may use their blocks. ``detach``: segments the
    executor may unmap; sent only after the scheduler reported that it holds no block above the
    lease and the step that migrated blocks off them has completed. ``target`` and ``reason``: the
    controller's estimate of the transparent lease and why it decided what it did; ``link_bandwidth``:
    its host -> device bandwidth estimate in bytes/s, 0 while unknown (all for /metrics).
    ``lease_id``: this grant's number, counting every HostLease the memory manager sent (1, 2, ...);
    the scheduler echoes the last one it applied in ``DemandReport.lease_id``.
    """

    lease: int
    attach: list[HostSegmentInfo] = []
    detach: list[int] = []
    target: int = 0
    reason: str = ""
    link_bandwidth: float = 0.0
    lease_id: int = 0


class SegmentUpdate(msgspec.Struct, tag=True, **HOT):
    """Scheduler -> executor, between plans on the plan channel (so ordered with them): map
    ``attach`` and unmap ``detach`` before the next plan."""

    attach: list[HostSegmentInfo] = []
    detach: list[int] = []


class PrefetchCommand(msgspec.Struct, tag=True, **HOT):
    """Memory manager -> scheduler -> executor: reshape the staging ring to ``num_staging_blocks``
    (M) host blocks per step, loaded ``prefetch_depth`` layers ahead of compute (``depth + 1`` areas,
    at most L), sized from the measured link bandwidth and step compute time
    (``workers.memory.prefetch``). The scheduler forwards it on the plan channel, so the executor
    resizes between steps, never during one, and plans no step that reads more than M distinct host
    blocks once it has sent it (the memory manager caps the lease at M, shrinking the lease before
    the ring and growing the ring before the lease). Invariants: ``1 <= num_staging_blocks <=`` the
    plan's ring capacity, ``prefetch_depth >= 1``. The per-step loads stay derived from each plan.
    ``reason``: why, for logs and /metrics."""

    prefetch_depth: int
    num_staging_blocks: int
    reason: str = ""


class DemandReport(msgspec.Struct, tag=True, **HOT):
    """Scheduler -> memory manager after each step and when going idle: the demand signals the
    expansion controller reads, and whether host memory above the lease can be released
    (``release_safe``: no block above ``host_lease`` is held and no plan in flight touches one).
    ``host_blocks_high_water``: one past the highest host block index in use — a release to less
    would have to move blocks (or preempt their requests), so the controller never asks for it.
    ``idle``: no step is in flight and none can run (sent on going idle; the next report, sent when
    a step starts again or completes, says False), so only an idle scheduler's silence means no
    steps. ``step_time`` and ``link_bandwidth``: the executor's time for the last step completed
    (0: none yet) and its copy benchmark (bytes/s, 0: none), from that step's result — what the
    controller needs to size its first grant the moment demand meets an empty lease, before the
    step's span reaches it. ``lease_id``: the ``HostLease.lease_id`` of the last lease the scheduler
    applied before writing this report (0: none yet). NOTE: reports and leases cross on the wire,
    so ``release_safe`` speaks only for that lease: a report written while a later grant was in
    flight says nothing about that grant's blocks, even when the lease has come back to the same
    size, and the memory manager releases on it nothing."""

    num_waiting: int
    num_preemptions: int
    num_host_blocks_in_use: int
    short_of_blocks: bool
    host_lease: int
    release_safe: bool = False
    host_blocks_high_water: int = 0
    idle: bool = False
    step_time: float = 0.0
    link_bandwidth: float = 0.0
    lease_id: int = 0
