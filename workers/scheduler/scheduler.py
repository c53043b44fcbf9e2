"""Continuous batching: each step's batch under a token budget, preemption by recompute, stop checks.

The engine loop alternates strictly::

    plan = scheduler.schedule()                 # None when there is nothing to run
    result = executor.execute(plan)
    deltas = scheduler.postprocess(plan, result)

with ``add_request`` and ``abort_requests`` allowed at any point in between.
"""

from __future__ import annotations

import struct
from array import array
from collections import deque
from collections.abc import Iterable

from pied.config import ConfigError, EngineConfig
from proto import (
    AddRequest,
    FinishReason,
    NewRequestData,
    StepPlan,
    StepResult,
    TokenDelta,
    TokenLogprobs,
    unpack_i32,
)
from workers.scheduler.block_manager import BlockManager
from workers.scheduler.request import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING
_PACK_I32 = struct.Struct("<i").pack


class Scheduler:
    """Owns the requests, the waiting and running queues and the device block pool.

    Scheduling follows vLLM v1: one token budget per step shared by prefills and decodes, the
    running requests first (oldest first), then waiting requests in arrival order. A request is
    "in prefill" whenever it has more than one uncomputed token, so a chunked prompt and a
    recomputation after preemption are the same thing.
    """

    def __init__(
        self, config: EngineConfig, num_device_blocks: int, eos_token_ids: set[int], max_model_len: int
    ) -> None:
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            # Without chunking a prompt (or a preempted request's recomputation) must fit one step.
            raise ConfigError(
                f"--max-num-batched-tokens ({config.max_num_batched_tokens}) must be at least the model "
                f"length ({max_model_len}) when chunked prefill is off."
            )
        self.block_size = config.block_size
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_device_blocks, config.block_size)
        # A request with more tokens than this can never have its whole context on the device.
        self.max_pool_tokens = num_device_blocks * config.block_size
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: preemption takes from the end
        self.num_preemptions = 0
        self._next_step_id = 0
        self._finished_request_ids: list[str] = []  # executor state to drop, sent with the next plan
        # The plan between schedule() and postprocess(): (request, num_scheduled_tokens, samples).
        self._in_flight: list[tuple[Request, int, bool]] | None = None
        self._in_flight_step_id = -1

    # ------------------------------------------------------------------ requests in and out

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def usage(self) -> float:
        return self.block_manager.usage

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(self, msg: AddRequest) -> list[TokenDelta]:
        """Queue a request. Returns its final ERROR delta instead when it can never run (an empty
        prompt, one over ``max_model_len``, or one larger than the whole device pool); else []."""
        if msg.request_id in self.requests:
            raise ValueError(f"request id {msg.request_id!r} is already in use.")
        request = Request.from_message(msg, self.eos_token_ids, self.max_model_len)
        error = ""
        if request.num_prompt_tokens == 0:
            error = "the prompt is empty."
        elif request.num_prompt_tokens > self.max_model_len:
            error = (
                f"the prompt has {request.num_prompt_tokens} tokens, more than the model length "
                f"{self.max_model_len}."
            )
        elif request.num_prompt_tokens > self.max_pool_tokens:
            error = self._pool_too_small(request)
        if error:
            request.status = RequestStatus.FINISHED
            return [self._final_delta(request, FinishReason.ERROR, error=error)]
        self.requests[request.request_id] = request
        self.waiting.append(request)
        return []

    def abort_requests(self, request_ids: Iterable[str]) -> list[TokenDelta]:
        """End these requests now (unknown or finished ids are ignored), free their blocks, and
        return their final ABORT deltas. A request in the plan in flight is skipped by postprocess.

        NOTE: freeing the blocks of a request in the plan in flight is safe: they can only be
        reused by a later plan, which the executor runs after the current one.
        """
        deltas = []
        aborted_running = False
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == _RUNNING:
                aborted_running = True
            else:
                self.waiting.remove(request)
            deltas.append(self._finish(request, FinishReason.ABORT))
        if aborted_running:
            self.running = [request for request in self.running if request.status == _RUNNING]
        return deltas

    # ------------------------------------------------------------------ one step

    def schedule(self) -> StepPlan | None:
        """Choose the next step's batch and give every scheduled request the blocks it needs."""
        if self._in_flight is not None:
            raise RuntimeError(f"schedule() called before postprocess() of step {self._in_flight_step_id}.")
        block_manager = self.block_manager
        block_size = self.block_size
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int, bool]] = []
        num_preemptions_before = self.num_preemptions
        # Blocks the scheduled requests will need for their next token; admitting a waiting request
        # into them would only get it preempted in the next step.
        num_reserved_blocks = 0

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = len(request.token_ids) - request.num_computed_tokens
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    index += 1
                    continue
                num_new = budget
            end = request.num_computed_tokens + num_new
            # Most decodes stay inside their last block: skip the allocator then.
            if end > len(request.block_table) * block_size and not self._allocate_running(request, end):
                break  # it preempted itself: it was the last running request
            samples = end == len(request.token_ids)
            scheduled.append((request, num_new, samples))
            budget -= num_new
            if samples and end % block_size == 0:
                num_reserved_blocks += 1
            index += 1

        # vLLM v1: no admissions in a step that had to preempt (the pool is already too tight).
        if self.num_preemptions == num_preemptions_before:
            waiting = self.waiting
            while waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                request = waiting[0]
                num_new = request.num_uncomputed_tokens
                if num_new > budget:
                    if not self.enable_chunked_prefill:
                        break  # first come, first served: nobody overtakes the head
                    num_new = budget
                end = request.num_computed_tokens + num_new
                num_blocks = block_manager.num_blocks_for(end) - len(request.block_table)
                if not block_manager.can_allocate(num_blocks + num_reserved_blocks):
                    break
                waiting.popleft()
                request.block_table.extend(block_manager.allocate(num_blocks))
                request.status = _RUNNING
                self.running.append(request)
                samples = end == request.num_tokens
                scheduled.append((request, num_new, samples))
                budget -= num_new
                if samples and end % block_size == 0:
                    num_reserved_blocks += 1

        if not scheduled:
            return None
        return self._make_plan(scheduled)

    def postprocess(self, plan: StepPlan, result: StepResult) -> list[TokenDelta]:
        """Apply a step's result: advance the cache, append sampled tokens, stop finished requests.
        Returns one delta per request that got a token or finished in this step."""
        if plan.step_id != self._in_flight_step_id or result.step_id != plan.step_id:
            raise ValueError(
                f"postprocess() got plan {plan.step_id} and result {result.step_id}; "
                f"step {self._in_flight_step_id} is in flight."
            )
        scheduled = self._in_flight
        assert scheduled is not None
        self._in_flight = None
        if result.error:
            return self._fail_step(scheduled, result.error)

        sampled_token_ids = unpack_i32(result.sampled_token_ids).tolist()
        num_samples = sum(samples for _, _, samples in scheduled)
        if len(sampled_token_ids) != num_samples:
            error = f"step {plan.step_id} returned {len(sampled_token_ids)} tokens for {num_samples} samples."
            return self._fail_step(scheduled, error)
        logprobs = result.logprobs or None
        deltas = []
        any_finished = False
        row = 0
        token_id, token_logprobs = 0, None
        for request, num_new, samples in scheduled:
            if samples:
                token_id = sampled_token_ids[row]
                token_logprobs = logprobs[row] if logprobs is not None else None
                row += 1
            if request.status != _RUNNING:
                continue  # aborted while the step ran: its row is ignored
            request.num_computed_tokens += num_new
            if not samples:
                continue
            request.token_ids.append(token_id)
            delta = self._check_stop(request, token_id, token_logprobs)
            if delta.finish_reason is not None:
                any_finished = True
            deltas.append(delta)
        if any_finished:
            self.running = [request for request in self.running if request.status == _RUNNING]
        return deltas

    # ------------------------------------------------------------------ internals

    def _allocate_running(self, request: Request, end: int) -> bool:
        """Give a running request blocks up to position ``end``, preempting the most recently
        admitted running requests while the pool is short. False if ``request`` itself was preempted."""
        block_manager = self.block_manager
        num_blocks = block_manager.num_blocks_for(end) - len(request.block_table)
        if num_blocks <= 0:
            return True
        while not block_manager.can_allocate(num_blocks):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        request.block_table.extend(block_manager.allocate(num_blocks))
        return True

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop its cache and queue it first, keeping its output so far."""
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _make_plan(self, scheduled: list[tuple[Request, int, bool]]) -> StepPlan:
        request_ids = []
        num_scheduled_tokens = array("i")
        token_ids = array("i")
        start_positions = array("i")
        num_blocks = array("i")
        block_tables = array("i")
        sample = bytearray()
        new_requests = []
        for request, num_new, samples in scheduled:
            start = request.num_computed_tokens
            request_ids.append(request.request_id)
            num_scheduled_tokens.append(num_new)
            if num_new == 1:
                token_ids.append(request.token_ids[start])
            else:
                token_ids.extend(request.token_ids[start : start + num_new])
            start_positions.append(start)
            num_blocks.append(len(request.block_table))
            block_tables.extend(request.block_table)
            sample.append(samples)
            if not request.executor_has_state:
                request.executor_has_state = True
                new_requests.append(
                    NewRequestData(request.request_id, request.packed_prompt_token_ids, request.params)
                )
        step_id = self._next_step_id
        self._next_step_id += 1
        self._in_flight = scheduled
        self._in_flight_step_id = step_id
        finished_request_ids, self._finished_request_ids = self._finished_request_ids, []
        return StepPlan(
            step_id=step_id,
            request_ids=request_ids,
            num_scheduled_tokens=num_scheduled_tokens.tobytes(),
            token_ids=token_ids.tobytes(),
            start_positions=start_positions.tobytes(),
            num_blocks=num_blocks.tobytes(),
            block_tables=block_tables.tobytes(),
            sample=bytes(sample),
            new_requests=new_requests,
            finished_request_ids=finished_request_ids,
        )

    def _check_stop(self, request: Request, token_id: int, logprobs: TokenLogprobs | None) -> TokenDelta:
        """The delta for a freshly sampled token, finishing the request if it should stop (vLLM
        order: a stop token first, then length). Stop tokens count only once ``min_tokens`` outputs
        came before them."""
        reason = None
        stop_token_id = -1
        error = ""
        num_tokens = len(request.token_ids)
        if (
            token_id in request.stop_token_ids
            and num_tokens - request.num_prompt_tokens > request.params.min_tokens
        ):
            reason = FinishReason.STOP
            stop_token_id = token_id
        elif num_tokens >= request.max_num_tokens:
            reason = FinishReason.LENGTH
        elif num_tokens > self.max_pool_tokens:
            # Its next step needs K/V for all its tokens at once, which the device pool cannot hold
            # even with every other request preempted: fail it rather than wait forever.
            reason = FinishReason.ERROR
            error = self._pool_too_small(request)
        packed_token_ids = _PACK_I32(token_id)
        if reason is not None:
            return self._finish(request, reason, packed_token_ids, stop_token_id, logprobs, error)
        return TokenDelta(
            request_id=request.request_id,
            token_ids=packed_token_ids,
            num_prompt_tokens=request.num_prompt_tokens,
            logprobs=[logprobs] if logprobs is not None else [],
            trace_context=request.trace_context,
        )

    def _fail_step(self, scheduled: list[tuple[Request, int, bool]], error: str) -> list[TokenDelta]:
        """The executor failed the step: end every request in it with ERROR (a retry would not see
        the K/V the failed step should have written)."""
        deltas = []
        for request, _, _ in scheduled:
            if request.status == _RUNNING:
                deltas.append(self._finish(request, FinishReason.ERROR, error=f"the model failed: {error}"))
        self.running = [request for request in self.running if request.status == _RUNNING]
        return deltas

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        packed_token_ids: bytes = b"",
        stop_token_id: int = -1,
        logprobs: TokenLogprobs | None = None,
        error: str = "",
    ) -> TokenDelta:
        """End a request: free its blocks and forget it. The caller removes it from its queue."""
        request.status = RequestStatus.FINISHED
        self._free_blocks(request)
        del self.requests[request.request_id]
        if request.executor_has_state:
            self._finished_request_ids.append(request.request_id)
        return self._final_delta(request, reason, packed_token_ids, stop_token_id, logprobs, error)

    def _final_delta(
        self,
        request: Request,
        reason: FinishReason,
        packed_token_ids: bytes = b"",
        stop_token_id: int = -1,
        logprobs: TokenLogprobs | None = None,
        error: str = "",
    ) -> TokenDelta:
        request.finish_reason = reason
        request.stop_token_id = stop_token_id
        request.error = error
        return TokenDelta(
            request_id=request.request_id,
            token_ids=packed_token_ids,
            finish_reason=reason,
            stop_token_id=stop_token_id,
            num_prompt_tokens=request.num_prompt_tokens,
            logprobs=[logprobs] if logprobs is not None else [],
            trace_context=request.trace_context,
            error=error,
        )

    def _free_blocks(self, request: Request) -> None:
        # Tail first, so that a future prefix cache evicts a sequence's last blocks before its prefix.
        self.block_manager.free(reversed(request.block_table))
        del request.block_table[:]

    def _pool_too_small(self, request: Request) -> str:
        num_blocks = self.block_manager.num_blocks_for(request.num_tokens)
        return (
            f"the request needs {num_blocks} KV blocks for its {request.num_tokens} tokens but the device "
            f"pool has only {self.block_manager.num_blocks} blocks of {self.block_size} tokens; "
            "raise --device-kv-blocks/--device-kv-gib or lower max_tokens."
        )
