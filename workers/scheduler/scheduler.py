"""Continuous batching: each step's batch under a token budget, preemption (by recompute, or by swap
in kv_policy swap), host blocks inside the lease (kv_policy pie), prefix caching, stop checks.

The engine loop alternates::

    plan = scheduler.schedule()                 # None when there is nothing to run
    result = executor.execute(plan)
    deltas = scheduler.postprocess(plan, result)

with ``add_request``, ``abort_requests`` and ``set_host_lease`` allowed at any point in between.

Async scheduling (``config.async_scheduling``, vLLM's ``--async-scheduling``, SGLang's overlap
scheduler): ``schedule()`` may be called once more while one plan is in flight, so the plan of step
t+1 is made while step t runs, and ``postprocess`` of step t runs while step t+1 does. A plan is
therefore accounted for when it is made: every scheduled request's ``num_computed_tokens`` advances
by its tokens at once, and a request that samples gets ``PLACEHOLDER_TOKEN_ID`` appended, which
``postprocess`` replaces by the sampled token. Step t+1 then schedules such a request's decode on the
placeholder (the executor substitutes the token it sampled), except when step t's token is surely
its last (``max_tokens``, the model length or the pool's size: known in advance). A request that
stops on step t's token (a stop token) or is aborted has a wasted row in step t+1 whose token is
dropped; its blocks are freed by ``postprocess(t)`` / ``abort_requests``, so only plans from t+2 on
can reuse them, and the executor runs those after t+1. A request preempted while its sampled token
is in flight keeps that token (``postprocess`` fills it in wherever the request waits), and is not
admitted again before it has it. Without async scheduling the same code runs with no plan ahead, so
a plan never holds a placeholder and the two modes give the same tokens.

This file is the algorithm: who runs, who waits, who is preempted, which blocks each holds. Packing
a batch into a ``StepPlan`` is ``plan_builder.py``'s; the stop rules and the deltas sent to clients
are ``stopping.py``'s; keeping host blocks inside a shrinking lease is ``host_lease.py``'s.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from proto import (
    PLACEHOLDER_TOKEN_ID,
    AddRequest,
    FinishReason,
    StepPlan,
    StepResult,
    TokenDelta,
    TokenLogprobs,
    unpack_i32,
)
from proto.config import ConfigError, EngineConfig
from workers.scheduler.host_lease import HostLeaseKeeper
from workers.scheduler.plan_builder import Scheduled, build_step_plan
from workers.scheduler.prefix_cache import PrefixCache, PrefixCacheStats, block_key, extend_block_hashes
from workers.scheduler.request import Request, RequestStatus
from workers.scheduler.request_queue import RequestQueue
from workers.scheduler.stopping import final_delta, finish_reason, pack_token_id, pool_too_small, token_delta
from workers.scheduler.tiers import BlockTiers

_RUNNING = RequestStatus.RUNNING
_SWAPPED = RequestStatus.SWAPPED
_FINISHED = RequestStatus.FINISHED


@dataclass
class InFlight:
    """A plan between ``schedule()`` and ``postprocess()``: its batch, and where in each sampling
    request's ``token_ids`` the placeholder for its sampled token sits (in batch order)."""

    step_id: int
    scheduled: list[Scheduled]
    sample_positions: list[int]


@dataclass(frozen=True)
class KVDemand:
    """What the adaptive expansion controller reads from the scheduler after a step: requests
    queued for blocks, preemptions so far, and whether the last ``schedule()`` was short of blocks
    (``num_blocks_short``: how many more the largest unmet allocation wanted)."""

    num_waiting: int
    num_swapped: int
    num_preemptions: int
    short_of_blocks: bool
    num_blocks_short: int


class Scheduler:
    """Owns the requests, the waiting, swapped and running queues and the block tiers.

    Scheduling follows vLLM v1: one token budget per step shared by prefills and decodes, the
    running requests first (oldest first), then swapped requests, then waiting requests in arrival
    order. A request is "in prefill" whenever it has more than one uncomputed token, so a chunked
    prompt and a recomputation after preemption are the same thing.

    Memory policy (``config.kv_policy``, DESIGN.md "Baselines inside the same engine"):
    - ``none``: device blocks only; a preempted request recomputes.
    - ``swap``: running requests hold device blocks only; a preempted request's blocks are copied to
      host blocks while the lease has room (else it recomputes) and copied back when it resumes.
    - ``pie``: running requests hold device blocks and, beyond them, host blocks inside the lease,
      which the executor streams; a preempted request recomputes.

    The memory manager grants the host lease with ``set_host_lease``; the scheduler never holds a
    host block at or above it once the next ``schedule()`` has run.

    Prefix caching (``config.enable_prefix_caching``): a request's full blocks are named once computed
    (``postprocess``); a request admitted from the waiting queue (new, or preempted to recompute)
    starts after the longest run of its full blocks found cached, on either tier, and shares them.
    At least its last token is always computed, so that there is a token to sample from. A request
    that asks for prompt logprobs reads no cached block until its prompt is done (vLLM's choice:
    recompute the positions rather than keep logits in the cache); it still offers its blocks.
    """

    def __init__(
        self,
        config: EngineConfig,
        num_device_blocks: int,
        eos_token_ids: set[int],
        max_model_len: int,
        num_host_blocks: int = 0,
    ) -> None:
        if config.kv_policy == "none" and num_host_blocks:
            raise ConfigError("--kv-policy none keeps no KV on the host; it takes no host blocks.")
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
        self.kv_policy = config.kv_policy
        self.prefix_cache = PrefixCache() if config.enable_prefix_caching else None
        self.tiers = BlockTiers(
            num_device_blocks,
            num_host_blocks,
            config.block_size,
            pooling=config.kv_policy == "pie",
            prefix_cache=self.prefix_cache,
        )
        self.block_manager = self.tiers.device
        self._swaps_preempted = config.kv_policy == "swap"
        # A request with more tokens than this can never have its whole context in the blocks a
        # running request may hold (the device, plus the largest lease under pie).
        num_pool_blocks = num_device_blocks + (num_host_blocks if self.tiers.pooling else 0)
        self.max_pool_tokens = num_pool_blocks * config.block_size
        self.requests: dict[str, Request] = {}  # every unfinished request
        # O(1) removal anywhere: aborting a queued request must not scan the queue.
        self.waiting = RequestQueue()
        self.swapped = RequestQueue()  # resumed before any waiting request
        self.running: list[Request] = []  # in admission order: preemption takes from the end
        self.num_preemptions = 0  # running requests that lost their place, by recompute or swap
        self.num_recomputes = 0  # requests whose cache was dropped (preempted, or swapped above a lease)
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_tail_promotions = 0
        self._lease = HostLeaseKeeper(self.tiers)
        # Distinct host blocks one step may read: the executor's staging ring (None: the largest
        # lease, the plan's ring). Every running request's host blocks are read by each step it is
        # scheduled in, so the lease itself is held at or below it.
        self._host_step_limit: int | None = None
        self._num_blocks_short = 0
        self._next_step_id = 0
        self._finished_request_ids: list[str] = []  # executor state to drop, sent with the next plan
        # Plans between schedule() and postprocess(), oldest first: one, or two with async scheduling.
        self.max_steps_in_flight = 2 if config.async_scheduling else 1
        self._in_flight: deque[InFlight] = deque()

    # ------------------------------------------------------------------ requests in and out

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    @property
    def usage(self) -> float:
        """Fraction of the device blocks in use (referenced: free cached blocks do not count)."""
        return self.tiers.device.usage

    @property
    def num_host_blocks(self) -> int:
        """H_max: host block ids ``[D, D + H_max)`` exist; only the lease may be used."""
        return self.tiers.host.num_blocks

    @property
    def host_lease(self) -> int:
        return self.tiers.host.lease

    @property
    def num_host_blocks_used(self) -> int:
        return self.tiers.host.num_used

    @property
    def host_usage(self) -> float:
        """Fraction of the host lease in use (referenced: free cached blocks do not count)."""
        return self.tiers.host.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Lookups and hits so far (all zero with prefix caching off)."""
        return self.prefix_cache.stats if self.prefix_cache is not None else PrefixCacheStats()

    @property
    def host_blocks_high_water(self) -> int:
        """One past the highest host block index in use: a lease this large moves no block."""
        return self.tiers.host.high_water

    @property
    def host_blocks_above_lease(self) -> int:
        """Host blocks in use at or above the lease: 0 after any ``schedule()``."""
        return self.tiers.host.num_used_above_lease

    @property
    def host_release_step_id(self) -> int:
        """The last step whose plan may read or write host blocks at or above the lease."""
        return self._lease.release_step_id

    @property
    def demand(self) -> KVDemand:
        return KVDemand(
            num_waiting=len(self.waiting),
            num_swapped=len(self.swapped),
            num_preemptions=self.num_preemptions,
            short_of_blocks=self._num_blocks_short > 0,
            num_blocks_short=self._num_blocks_short,
        )

    def set_host_lease(self, num_blocks: int) -> None:
        """The memory manager grants host block ids ``[D, D + num_blocks)``. Shrinking below blocks in
        use is allowed: the next ``schedule()`` moves them to the device or preempts their requests.
        Host memory above the new lease may be unmapped once ``host_blocks_above_lease`` is 0 and the
        result of step ``host_release_step_id`` is back (plans made until then may still touch it).
        Never above the host step limit (``set_host_step_limit``)."""
        if self._host_step_limit is not None:
            num_blocks = min(num_blocks, self._host_step_limit)
        self._lease.set(num_blocks, self._next_step_id - 1)

    @property
    def host_step_limit(self) -> int | None:
        return self._host_step_limit

    def set_host_step_limit(self, num_blocks: int) -> None:
        """The executor's staging ring now serves ``num_blocks`` distinct host blocks per step
        (``proto.PrefetchCommand``): no plan from the next ``schedule()`` on reads more. The lease
        is lowered to it if above (the memory manager caps it there already; this keeps the
        scheduler safe on its own)."""
        if num_blocks < 0:
            raise ValueError(f"a host step limit must be non-negative, got {num_blocks}.")
        self._host_step_limit = num_blocks
        if self.host_lease > num_blocks:
            self._lease.set(num_blocks, self._next_step_id - 1)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._in_flight)

    def can_schedule(self) -> bool:
        """Whether ``schedule()`` may be called now: no plan in flight, or (async scheduling) one."""
        return len(self._in_flight) < self.max_steps_in_flight

    def add_request(self, msg: AddRequest) -> list[TokenDelta]:
        """Queue a request. Returns its final ERROR delta instead when it can never run (an empty
        prompt, one over ``max_model_len``, or one larger than the whole pool); else []."""
        if msg.request_id in self.requests:
            raise ValueError(f"request id {msg.request_id!r} is already in use.")
        if msg.params.n != 1:
            raise ValueError(
                f"request {msg.request_id!r} has n={msg.params.n}: add its choices() one by one."
            )
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
            return [final_delta(request, FinishReason.ERROR, error=error)]
        self.requests[request.request_id] = request
        self.waiting.append(request)
        return []

    def abort_requests(self, request_ids: Iterable[str]) -> list[TokenDelta]:
        """End these requests now (unknown or finished ids are ignored), free their blocks, and
        return their final ABORT deltas. A request in a plan in flight is skipped by postprocess.

        NOTE: freeing the blocks of a request in a plan in flight is safe: they can only be reused
        by a plan made from now on, which the executor runs after every plan in flight.
        """
        deltas = []
        aborted_running = False
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == _RUNNING:
                aborted_running = True
            elif request.status == _SWAPPED:
                self.swapped.remove(request)
            else:
                self.waiting.remove(request)
            deltas.append(self._finish(request, final_delta(request, FinishReason.ABORT)))
        if aborted_running:
            self.running = [request for request in self.running if request.status == _RUNNING]
        return deltas

    # ------------------------------------------------------------------ one step

    def schedule(self) -> StepPlan | None:
        """Choose the next step's batch and give every scheduled request the blocks it needs."""
        if not self.can_schedule():
            oldest = self._in_flight[0].step_id
            raise RuntimeError(f"schedule() called before postprocess() of step {oldest}.")
        tiers = self.tiers
        block_size = self.block_size
        budget = self.max_num_batched_tokens
        scheduled: list[Scheduled] = []
        self._num_blocks_short = 0
        if tiers.host.num_used_above_lease:
            self._lease.settle(self.running, self.swapped, self._preempt, self._recompute)
        num_preemptions_before = self.num_preemptions
        # Blocks the scheduled requests will need for their next token; admitting a waiting request
        # into them would only get it preempted in the next step.
        num_reserved_blocks = 0

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_tokens = len(request.token_ids)
            if request.token_ids[-1] == PLACEHOLDER_TOKEN_ID and (
                num_tokens >= request.max_num_tokens or num_tokens > self.max_pool_tokens
            ):
                index += 1  # the token in flight is its last (it finishes on it): nothing to run
                continue
            num_new = num_tokens - request.num_computed_tokens
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
            if self.swapped:
                budget, num_reserved_blocks = self._admit(
                    self.swapped, scheduled, budget, num_reserved_blocks
                )
            if not self.swapped:  # first come, first served: swapped requests resume before new ones
                budget, num_reserved_blocks = self._admit(
                    self.waiting, scheduled, budget, num_reserved_blocks
                )

        if tiers.pooling and tiers.host.num_used and tiers.device.num_free > num_reserved_blocks:
            self._promote_tails(scheduled, num_reserved_blocks)
        if not scheduled:
            return None  # copies gathered so far ride on the next plan
        return self._make_plan(scheduled)

    def postprocess(self, plan: StepPlan, result: StepResult) -> list[TokenDelta]:
        """Apply the oldest plan in flight's result: name the blocks it filled, put the sampled tokens
        in place of their placeholders, stop finished requests. Returns one delta per request that
        got a token or finished in this step."""
        oldest = self._in_flight[0].step_id if self._in_flight else None
        if plan.step_id != oldest or result.step_id != plan.step_id:
            raise ValueError(
                f"postprocess() got plan {plan.step_id} and result {result.step_id}; "
                f"the oldest step in flight is {oldest}."
            )
        in_flight = self._in_flight.popleft()
        scheduled = in_flight.scheduled
        if result.error:
            return self._fail_step(scheduled, result.error)

        sampled_token_ids = unpack_i32(result.sampled_token_ids).tolist()
        num_samples = sum(samples for _, _, samples in scheduled)
        if len(sampled_token_ids) != num_samples:
            error = f"step {plan.step_id} returned {len(sampled_token_ids)} tokens for {num_samples} samples."
            return self._fail_step(scheduled, error)
        logprobs = result.logprobs or None
        for run in result.prompt_logprobs:
            owner = self.requests.get(run.request_id)  # unfinished (it may have been preempted since)
            if owner is not None:
                owner.pending_prompt_logprobs.append(run)
        cache_blocks = self.prefix_cache is not None
        # Tokens the plan ahead (async scheduling) counts as computed already: its blocks are not
        # named before its result is back.
        ahead: dict[Request, int] = {}
        if self._in_flight:
            ahead = {request: num_new for request, num_new, _ in self._in_flight[0].scheduled}
        block_size = self.block_size
        deltas = []
        any_finished = False
        row = 0
        positions = iter(in_flight.sample_positions)
        token_id, token_logprobs, position = 0, None, 0
        for request, _, samples in scheduled:
            if samples:
                token_id = sampled_token_ids[row]
                token_logprobs = logprobs[row] if logprobs is not None else None
                position = next(positions)
                row += 1
            status = request.status
            if status == _FINISHED:
                continue  # aborted while the step ran: its row is ignored
            if (
                cache_blocks
                and status == _RUNNING
                and request.num_computed_tokens - ahead.get(request, 0)
                >= (request.num_registered_blocks + 1) * block_size
            ):
                self._cache_full_blocks(request, request.num_computed_tokens - ahead.get(request, 0))
            if not samples:
                continue
            request.token_ids[position] = token_id
            if not request.first_token_time:
                request.first_token_time = time.monotonic()
            delta = self._check_stop(request, token_id, token_logprobs, position + 1)
            if delta.finish_reason is not None:
                any_finished = True
                if status != _RUNNING:  # preempted while its token was in flight
                    (self.swapped if status == _SWAPPED else self.waiting).remove(request)
            deltas.append(delta)
        if any_finished:
            self.running = [request for request in self.running if request.status == _RUNNING]
        return deltas

    # ------------------------------------------------------------------ internals

    def _allocate_running(self, request: Request, end: int) -> bool:
        """Give a running request blocks up to position ``end``, preempting the most recently
        admitted running requests while the pool is short. False if ``request`` itself was preempted."""
        tiers = self.tiers
        num_blocks = tiers.num_blocks_for(end) - len(request.block_table)
        if num_blocks <= 0:
            return True
        if not tiers.can_allocate(num_blocks):
            self._note_short(num_blocks - tiers.num_free)
            while not tiers.can_allocate(num_blocks):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is request:
                    return False
        tiers.allocate(request.block_table, num_blocks, request.num_computed_tokens)
        return True

    def _admit(
        self,
        queue: RequestQueue,
        scheduled: list[Scheduled],
        budget: int,
        num_reserved_blocks: int,
    ) -> tuple[int, int]:
        """Move requests from the head of ``queue`` (swapped or waiting) into the running batch while
        the budget, ``max_num_seqs`` and free blocks allow. Returns the budget and reserve left."""
        tiers = self.tiers
        block_size = self.block_size
        while queue and budget > 0 and len(self.running) < self.max_num_seqs:
            request = queue.head()
            if request.token_ids[-1] == PLACEHOLDER_TOKEN_ID:
                break  # preempted while its last token is in flight: it resumes once it has it
            is_swapped = request.status == _SWAPPED
            # A waiting request holds no block; with prefix caching it may start after cached ones.
            look_up = self.prefix_cache is not None and not is_swapped and request.reads_prefix_cache
            cached_block_ids = self._cached_prefix(request) if look_up else []
            num_computed = request.num_computed_tokens + len(cached_block_ids) * block_size
            num_new = request.num_tokens - num_computed
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break  # first come, first served: nobody overtakes the head
                num_new = budget
            end = num_computed + num_new
            num_new_blocks = tiers.num_blocks_for(end) - len(cached_block_ids)
            if is_swapped:
                # A swapped request comes back to the device whole: its host blocks become device blocks.
                num_blocks, num_free = num_new_blocks, tiers.device.num_free
            else:
                # Sharing a cached block that nobody holds takes it out of the free pool too.
                num_blocks = num_new_blocks + tiers.num_blocks_to_share(cached_block_ids)
                num_free = tiers.num_free
            if num_blocks + num_reserved_blocks > num_free:
                self._note_short(num_blocks + num_reserved_blocks - num_free)
                break
            queue.popleft()
            if is_swapped:
                tiers.swap_in(request.block_table)
                self.num_swap_ins += 1
            elif look_up:
                self._share_cached_prefix(request, cached_block_ids, num_new_blocks + num_reserved_blocks)
            num_new_blocks = tiers.num_blocks_for(end) - len(request.block_table)
            if num_new_blocks:
                tiers.allocate(request.block_table, num_new_blocks, request.num_computed_tokens)
            request.status = _RUNNING
            if not request.scheduled_time:
                request.scheduled_time = time.monotonic()
            self.running.append(request)
            samples = end == request.num_tokens
            scheduled.append((request, num_new, samples))
            budget -= num_new
            if samples and end % block_size == 0:
                num_reserved_blocks += 1
        return budget, num_reserved_blocks

    def _preempt(self, request: Request) -> None:
        """Take a running request out of the batch: swap its blocks out under kv_policy swap while
        the lease has room, else drop its cache to recompute it; either way it keeps its output."""
        self.num_preemptions += 1
        if self._swaps_preempted and self.tiers.swap_out(request.block_table, request.num_computed_tokens):
            request.status = _SWAPPED
            self.swapped.appendleft(request)
            self.num_swap_outs += 1
            return
        self._recompute(request)

    def _recompute(self, request: Request) -> None:
        """Drop a request's cache and queue it first: it recomputes its prompt and output so far (its
        cached blocks stay cached, so it usually finds most of them again)."""
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.num_registered_blocks = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_recomputes += 1

    def _promote_tails(self, scheduled: list[Scheduled], num_reserved_blocks: int) -> None:
        """kv_policy pie: device blocks nobody needs this step or next take host tails back, so the
        requests that got a host tail while the device was full append to the device again."""
        tiers = self.tiers
        for request, _, _ in scheduled:
            if tiers.device.num_free <= num_reserved_blocks:
                return
            if tiers.promote_tail(request.block_table):
                self.num_tail_promotions += 1

    def _cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks a waiting request can start after: its longest run of cached full blocks,
        leaving at least its last token to compute (vLLM: a fully cached prompt recomputes its last
        block, which is then the request's own to append to)."""
        num_blocks = (request.num_tokens - 1) // self.block_size
        if num_blocks == 0:
            return []
        hashes = request.block_hashes
        token_ids = request.token_ids
        block_size = self.block_size
        extend_block_hashes(hashes, token_ids, num_blocks, block_size)
        keys = (block_key(hashes, token_ids, index, block_size) for index in range(num_blocks))
        return self.tiers.cached_prefix(hashes[:num_blocks], keys)

    def _share_cached_prefix(
        self, request: Request, block_ids: list[int], num_device_blocks_needed: int
    ) -> None:
        """Admit a waiting request onto its cached prefix, and count the lookup."""
        stats = self.prefix_cache_stats
        stats.num_query_tokens += request.num_tokens
        num_host_hits = self.tiers.share(request.block_table, block_ids, num_device_blocks_needed)
        num_hit_tokens = len(block_ids) * self.block_size
        stats.num_host_hit_tokens += num_host_hits * self.block_size
        stats.num_device_hit_tokens += num_hit_tokens - num_host_hits * self.block_size
        request.num_computed_tokens = num_hit_tokens
        request.num_registered_blocks = len(block_ids)
        if not request.executor_has_state:  # its first admission: what usage reports as cached
            request.num_cached_tokens = num_hit_tokens

    def _cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Name the request's blocks that its first ``num_computed_tokens`` fill (tokens whose K/V a
        finished step wrote), from the first not yet offered."""
        block_size = self.block_size
        num_full_blocks = num_computed_tokens // block_size
        hashes = request.block_hashes
        token_ids = request.token_ids
        extend_block_hashes(hashes, token_ids, num_full_blocks, block_size)
        table = request.block_table
        for index in range(request.num_registered_blocks, num_full_blocks):
            self.tiers.cache_block(
                table[index], hashes[index], block_key(hashes, token_ids, index, block_size)
            )
        request.num_registered_blocks = num_full_blocks

    def _note_short(self, num_blocks: int) -> None:
        self._num_blocks_short = max(self._num_blocks_short, num_blocks)

    def _make_plan(self, scheduled: list[Scheduled]) -> StepPlan:
        step_id = self._next_step_id
        self._next_step_id += 1
        finished_request_ids, self._finished_request_ids = self._finished_request_ids, []
        self._lease.note_plan(step_id)
        swap_out, swap_in = self.tiers.take_copies()
        plan = build_step_plan(step_id, scheduled, finished_request_ids, swap_out, swap_in)
        # The plan counts as run from now on (see the module doc): the next plan may follow it.
        sample_positions = []
        for request, num_new, samples in scheduled:
            request.num_computed_tokens += num_new
            if samples:
                sample_positions.append(len(request.token_ids))
                request.token_ids.append(PLACEHOLDER_TOKEN_ID)
        self._in_flight.append(InFlight(step_id, scheduled, sample_positions))
        return plan

    def _check_stop(
        self, request: Request, token_id: int, logprobs: TokenLogprobs | None, num_tokens: int
    ) -> TokenDelta:
        """The delta for a freshly sampled token (the request's ``num_tokens``-th), finishing the
        request if it should stop."""
        reason = finish_reason(request, token_id, self.max_pool_tokens, num_tokens)
        packed_token_ids = pack_token_id(token_id)
        if reason is None:
            return token_delta(request, packed_token_ids, logprobs)
        stop_token_id = token_id if reason == FinishReason.STOP else -1
        error = self._pool_too_small(request) if reason == FinishReason.ERROR else ""
        delta = final_delta(request, reason, packed_token_ids, stop_token_id, logprobs, error)
        return self._finish(request, delta)

    def _fail_step(self, scheduled: list[Scheduled], error: str) -> list[TokenDelta]:
        """The executor failed the step: end every request in it with ERROR (a retry would not see
        the K/V the failed step should have written), wherever it waits now."""
        deltas = []
        for request, _, _ in scheduled:
            status = request.status
            if status == _FINISHED:
                continue
            if status != _RUNNING:  # preempted after the step was planned (async scheduling)
                (self.swapped if status == _SWAPPED else self.waiting).remove(request)
            delta = final_delta(request, FinishReason.ERROR, error=f"the model failed: {error}")
            deltas.append(self._finish(request, delta))
        self.running = [request for request in self.running if request.status == _RUNNING]
        return deltas

    def _finish(self, request: Request, delta: TokenDelta) -> TokenDelta:
        """End a request (``delta`` is its final one, passed through): free its blocks and forget it.
        The caller removes it from its queue."""
        request.status = RequestStatus.FINISHED
        self._free_blocks(request)
        del self.requests[request.request_id]
        if request.executor_has_state:
            self._finished_request_ids.append(request.request_id)
        return delta

    def _free_blocks(self, request: Request) -> None:
        self.tiers.free(request.block_table)

    def _pool_too_small(self, request: Request) -> str:
        return pool_too_small(request.num_tokens, self.block_size, self.max_pool_tokens, self.tiers.pooling)
