"""The scheduler driven by a fake executor: a 'model' whose next token is a hash of the context it
reads back through the plan's block tables, so any mistake in positions, block tables, chunking,
preemption or the copies between the device and host tiers changes the output."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proto import (
    AddRequest,
    FinishReason,
    SamplingParams,
    StepPlan,
    StepResult,
    TokenDelta,
    TokenLogprobs,
    pack_i32,
    unpack_i32,
)
from proto.config import ConfigError, EngineConfig
from workers.scheduler.request import RequestStatus
from workers.scheduler.scheduler import Scheduler

VOCAB = 50
EOS = 0


def next_token(context) -> int:
    """The fake model: deterministic in the whole context, order included."""
    return (int(np.sum(context)) * 7 + len(context)) % VOCAB


class FakeExecutor:
    """Runs StepPlans on a paged 'KV cache' that stores token ids, checking the plan as it goes.

    Block ids ``[0, num_blocks)`` are device blocks and ``[num_blocks, num_blocks + num_host_blocks)``
    host blocks, one store for both. A plan's swap_out copies run first, then its swap_in copies, then
    the forward pass, like the real executor; a copied-from block that no request holds any more is
    poisoned afterwards, so a plan that still reads it loses context. Requests may share blocks (prefix
    caching), but never one that a request of the plan writes into."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        script: dict[str, list[int]] | None = None,
        logprobs: bool = False,
        num_host_blocks: int = 0,
    ) -> None:
        self.block_size = block_size
        self.num_device_blocks = num_blocks
        self.num_host_blocks = num_host_blocks
        self.kv = np.full((num_blocks + num_host_blocks) * block_size, -1, dtype=np.int64)
        self.script = script or {}
        self.logprobs = logprobs
        self.sequences: dict[str, list[int]] = {}  # executor state: prompt + tokens sampled so far
        self.num_prompt_tokens: dict[str, int] = {}
        self.num_computed: dict[str, int] = {}
        self.ever_seen: set[str] = set()
        self.dropped: set[str] = set()
        self.num_steps = 0
        self.max_host_blocks_per_step = 0

    def execute(self, plan: StepPlan, held_block_ids: set[int] | None = None) -> StepResult:
        """``held_block_ids``: blocks some request holds after the plan was made (a swap_out may copy
        one that others still read); None poisons every copied-from block."""
        self.num_steps += 1
        self._copy(plan.swap_out, to_host=True, held_block_ids=held_block_ids)
        self._copy(plan.swap_in, to_host=False, held_block_ids=held_block_ids)
        for request_id in plan.finished_request_ids:
            assert request_id in self.sequences, f"finished {request_id} unknown or sent twice"
            del self.sequences[request_id]
            self.dropped.add(request_id)
        for new in plan.new_requests:
            assert new.request_id not in self.ever_seen, f"new_requests sent {new.request_id} twice"
            self.ever_seen.add(new.request_id)
            prompt = unpack_i32(new.prompt_token_ids).tolist()
            self.sequences[new.request_id] = prompt
            self.num_prompt_tokens[new.request_id] = len(prompt)
            self.num_computed[new.request_id] = 0
        num_scheduled = unpack_i32(plan.num_scheduled_tokens)
        starts = unpack_i32(plan.start_positions)
        num_blocks = unpack_i32(plan.num_blocks)
        token_ids = unpack_i32(plan.token_ids)
        block_tables = unpack_i32(plan.block_tables)
        sample = np.frombuffer(plan.sample, dtype=np.uint8)
        count = len(plan.request_ids)
        assert len(set(plan.request_ids)) == count
        assert len(num_scheduled) == len(starts) == len(num_blocks) == len(sample) == count
        assert len(token_ids) == num_scheduled.sum() and len(block_tables) == num_blocks.sum()
        tables = np.split(block_tables, np.cumsum(num_blocks)[:-1])
        assert all(len(np.unique(table)) == len(table) for table in tables), "a block twice in one table"
        holders = collections.Counter(block_id for table in tables for block_id in table.tolist())
        shared = {block_id for block_id, count in holders.items() if count > 1}
        for table, start, num_new in zip(tables, starts.tolist(), num_scheduled.tolist()):
            written = table[start // self.block_size : -(-(start + num_new) // self.block_size)]
            assert shared.isdisjoint(written.tolist()), "a request writes into a block another one reads"
        num_pool_blocks = self.num_device_blocks + self.num_host_blocks
        assert ((block_tables >= 0) & (block_tables < num_pool_blocks)).all()
        # The staging ring holds at most H_max distinct host blocks: the lease caps what a plan can
        # reference (a block shared by several requests is staged once).
        num_host_blocks = len(np.unique(block_tables[block_tables >= self.num_device_blocks]))
        assert num_host_blocks <= self.num_host_blocks
        self.max_host_blocks_per_step = max(self.max_host_blocks_per_step, num_host_blocks)

        sampled, logprobs = [], []
        token_offset = block_offset = 0
        for i, request_id in enumerate(plan.request_ids):
            sequence = self.sequences[request_id]
            start, num_new, num_table = int(starts[i]), int(num_scheduled[i]), int(num_blocks[i])
            end = start + num_new
            table = block_tables[block_offset : block_offset + num_table]
            tokens = token_ids[token_offset : token_offset + num_new]
            token_offset += num_new
            block_offset += num_table
            assert num_new >= 1
            assert num_table == -(-end // self.block_size), "block table must cover exactly the step"
            # Either it continues where it left off, or it (re)starts at a block boundary: from 0 or after
            # a cached prefix, new or after a preemption.
            assert start == self.num_computed[request_id] or start % self.block_size == 0
            assert tokens.tolist() == sequence[start:end], "scheduled tokens are not the sequence"
            assert bool(sample[i]) == (end == len(sequence))
            self._write(table, start, tokens)
            self.num_computed[request_id] = end
            if sample[i]:
                context = self._read(table, end)
                assert context.tolist() == sequence, "the cache lost part of the context"
                token = self._next(request_id, context)
                sequence.append(token)
                sampled.append(token)
                logprobs.append(TokenLogprobs(logprob=-float(token)) if self.logprobs else None)
        return StepResult(
            step_id=plan.step_id,
            sampled_token_ids=pack_i32(sampled),
            logprobs=logprobs if self.logprobs else [],
        )

    def _copy(self, packed_pairs: bytes, to_host: bool, held_block_ids: set[int] | None = None) -> None:
        """Whole-block copies (src, dst) across tiers, as one batch: all reads, then all writes."""
        if not packed_pairs:
            return
        pairs = unpack_i32(packed_pairs).reshape(-1, 2).tolist()
        sources = [source for source, _ in pairs]
        destinations = [destination for _, destination in pairs]
        assert len(set(sources)) == len(sources) and len(set(destinations)) == len(destinations)
        num_device_blocks, num_pool_blocks = (
            self.num_device_blocks,
            self.num_device_blocks + self.num_host_blocks,
        )
        for source, destination in pairs:
            device_id, host_id = (source, destination) if to_host else (destination, source)
            assert 0 <= device_id < num_device_blocks <= host_id < num_pool_blocks
        blocks = self.kv.reshape(-1, self.block_size)
        blocks[destinations] = blocks[sources]
        blocks[sorted(set(sources) - set(destinations) - (held_block_ids or set()))] = -1

    def _slots(self, table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return (
            table[positions // self.block_size].astype(np.int64) * self.block_size
            + positions % self.block_size
        )

    def _write(self, table: np.ndarray, start: int, tokens: np.ndarray) -> None:
        self.kv[self._slots(table, np.arange(start, start + len(tokens)))] = tokens

    def _read(self, table: np.ndarray, end: int) -> np.ndarray:
        return self.kv[self._slots(table, np.arange(end))]

    def _next(self, request_id: str, context: np.ndarray) -> int:
        if request_id in self.script:
            return self.script[request_id][len(context) - self.num_prompt_tokens[request_id]]
        return next_token(context)


@dataclasses.dataclass
class Output:
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_token_id: int = -1
    error: str = ""
    deltas: list[TokenDelta] = dataclasses.field(default_factory=list)


class Driver:
    """The engine loop: add/abort between steps, schedule, execute, postprocess."""

    def __init__(self, scheduler: Scheduler, executor: FakeExecutor) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.outputs: dict[str, Output] = {}
        self.plans: list[StepPlan] = []

    def add(self, request_id: str, prompt: list[int], **params) -> None:
        self.collect(self.scheduler.add_request(make_request(request_id, prompt, **params)))

    def collect(self, deltas: list[TokenDelta]) -> None:
        for delta in deltas:
            output = self.outputs.setdefault(delta.request_id, Output())
            assert output.finish_reason is None, f"{delta.request_id} got a delta after its last one"
            tokens = unpack_i32(delta.token_ids).tolist()
            assert len(tokens) <= 1
            assert delta.finish_reason is not None or len(tokens) == 1
            output.token_ids += tokens
            output.finish_reason = delta.finish_reason
            output.stop_token_id = delta.stop_token_id
            output.error = delta.error
            output.deltas.append(delta)

    def step(self, mid_step: Callable[[], None] | None = None) -> StepPlan | None:
        plan = self.scheduler.schedule()
        if plan is None:
            return None
        check_plan_against_tiers(self.scheduler, plan)
        self.plans.append(plan)
        held = {block_id for request in self.scheduler.requests.values() for block_id in request.block_table}
        result = self.executor.execute(plan, held)
        if mid_step is not None:
            mid_step()
        self.collect(self.scheduler.postprocess(plan, result))
        return plan

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            assert self.step() is not None, "unfinished requests but nothing scheduled"
        raise AssertionError("the scheduler did not finish (deadlock or livelock)")


def make_request(request_id: str, prompt: list[int], trace_context: str = "", **params) -> AddRequest:
    return AddRequest(
        request_id=request_id,
        prompt_token_ids=pack_i32(prompt),
        params=SamplingParams(**params),
        trace_context=trace_context,
    )


def make(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    enable_chunked_prefill: bool = True,
    max_model_len: int = 64,
    eos_token_ids: set[int] | None = None,
    script: dict[str, list[int]] | None = None,
    logprobs: bool = False,
    kv_policy: str = "none",
    num_host_blocks: int = 0,
    host_lease: int | None = None,
    enable_prefix_caching: bool = False,
) -> Driver:
    """A scheduler and fake executor; ``host_lease`` defaults to every host block. Prefix caching is
    off unless asked for, so that tests about placement and preemption see exactly their blocks."""
    config = EngineConfig(
        block_size=block_size,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        enable_chunked_prefill=enable_chunked_prefill,
        kv_policy=kv_policy,
        enable_prefix_caching=enable_prefix_caching,
    )
    scheduler = Scheduler(
        config, num_blocks, {EOS} if eos_token_ids is None else eos_token_ids, max_model_len, num_host_blocks
    )
    scheduler.set_host_lease(num_host_blocks if host_lease is None else host_lease)
    return Driver(scheduler, FakeExecutor(num_blocks, block_size, script, logprobs, num_host_blocks))


def check_plan_against_tiers(scheduler: Scheduler, plan: StepPlan) -> None:
    """Right after schedule(): every block's reference count is the number of requests holding it
    (one, unless prefix caching shares it), every block is accounted for in its tier, a block that
    the plan writes into is neither shared nor cached, and the plan uses no host block at or above the
    lease (a migration may still read one)."""
    num_device_blocks = scheduler.block_manager.num_blocks
    lease_end = num_device_blocks + scheduler.host_lease
    tiers = scheduler.tiers
    assert scheduler.host_blocks_above_lease == 0
    held = collections.Counter(
        block_id for request in scheduler.requests.values() for block_id in request.block_table
    )
    assert all(tiers.ref_count(block_id) == count for block_id, count in held.items())
    if scheduler.prefix_cache is None:
        assert all(count == 1 for count in held.values())
    assert sum(block_id < num_device_blocks for block_id in held) == scheduler.block_manager.num_used
    assert sum(block_id >= num_device_blocks for block_id in held) == scheduler.num_host_blocks_used
    assert all(block_id < lease_end for block_id in held)
    for request_id, start, num_new, _ in plan_rows(plan):
        table = scheduler.requests[request_id].block_table
        block_size = scheduler.block_size
        for block_id in table[start // block_size : -(-(start + num_new) // block_size)]:
            assert held[block_id] == 1, "a plan writes into a shared block"
            if scheduler.prefix_cache is not None:
                assert block_id not in scheduler.prefix_cache, "a plan writes into a cached block"
    assert all(not request.block_table for request in scheduler.waiting)
    assert all(
        block_id >= num_device_blocks for request in scheduler.swapped for block_id in request.block_table
    )
    if scheduler.kv_policy != "pie":
        assert all(
            block_id < num_device_blocks for request in scheduler.running for block_id in request.block_table
        )
    else:
        # A scheduled tail is on the host only while every free device block is reserved for the
        # scheduled requests whose next token opens a block.
        block_size = scheduler.block_size
        tails = [scheduler.requests[request_id].block_table[-1] for request_id in plan.request_ids]
        if any(tail >= num_device_blocks for tail in tails):
            num_reserved = sum(
                samples and (start + num) % block_size == 0 for _, start, num, samples in plan_rows(plan)
            )
            assert scheduler.block_manager.num_free <= num_reserved
    assert (unpack_i32(plan.swap_out)[1::2] < lease_end).all()


def plan_rows(plan: StepPlan) -> list[tuple[str, int, int, bool]]:
    """(request id, start position, number of tokens, samples) per scheduled request."""
    return list(
        zip(
            plan.request_ids,
            unpack_i32(plan.start_positions).tolist(),
            unpack_i32(plan.num_scheduled_tokens).tolist(),
            [bool(flag) for flag in plan.sample],
        )
    )


def assert_pool_empty(driver: Driver) -> None:
    scheduler = driver.scheduler
    manager = scheduler.block_manager
    assert manager.num_free == manager.num_blocks and scheduler.usage == 0.0
    assert all(manager.ref_count(block_id) == 0 for block_id in range(manager.num_blocks))
    host = scheduler.tiers.host
    assert scheduler.num_host_blocks_used == 0 and scheduler.host_usage == 0.0
    assert host.num_free == host.lease
    assert not any(host.is_used(manager.num_blocks + index) for index in range(host.num_blocks))
    assert not scheduler.has_unfinished()
    assert scheduler.num_running == scheduler.num_waiting == scheduler.num_swapped == 0


# ---------------------------------------------------------------- batching


def test_chunked_prefill_covers_the_prompt_exactly_under_the_budget():
    driver = make(max_num_batched_tokens=32, max_model_len=128, num_blocks=64)
    prompt = list(range(1, 101))
    driver.add("a", prompt, max_tokens=2, ignore_eos=True)
    rows = [plan_rows(driver.step())[0] for _ in range(4)]
    assert rows == [("a", 0, 32, False), ("a", 32, 32, False), ("a", 64, 32, False), ("a", 96, 4, True)]
    assert b"".join(unpack_i32(plan.token_ids).tobytes() for plan in driver.plans) == pack_i32(prompt)
    driver.run()
    assert driver.outputs["a"].finish_reason == FinishReason.LENGTH
    assert len(driver.outputs["a"].token_ids) == 2
    assert_pool_empty(driver)


def test_mixed_steps_respect_the_token_budget_and_max_num_seqs():
    driver = make(max_num_batched_tokens=10, max_num_seqs=3, max_model_len=64, num_blocks=64)
    for i in range(6):
        driver.add(f"r{i}", [i + 1] * (5 + 3 * i), max_tokens=6, ignore_eos=True)
    mixed = 0
    while driver.scheduler.has_unfinished():
        plan = driver.step()
        rows = plan_rows(plan)
        assert sum(num for _, _, num, _ in rows) <= 10
        assert len(rows) <= 3 and driver.scheduler.num_running <= 3
        decodes = [row for row in rows if row[2] == 1 and row[3]]
        mixed += bool(decodes) and len(decodes) < len(rows)
    assert mixed > 0, "expected steps mixing decodes with prefill chunks"
    # Decodes go first: within a step, running requests come in admission order before new ones.
    assert all(len(driver.outputs[f"r{i}"].token_ids) == 6 for i in range(6))
    assert_pool_empty(driver)


def test_decodes_are_scheduled_before_waiting_prefills():
    driver = make(max_num_batched_tokens=8, max_model_len=64)
    driver.add("old", [1, 2, 3], max_tokens=10, ignore_eos=True)
    driver.step()
    driver.add("new", list(range(1, 21)), max_tokens=1, ignore_eos=True)
    assert plan_rows(driver.step()) == [("old", 3, 1, True), ("new", 0, 7, False)]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    driver = make(max_num_batched_tokens=64, enable_chunked_prefill=False, max_model_len=64)
    driver.add("a", [1] * 40, max_tokens=3, ignore_eos=True)
    driver.add("b", [2] * 30, max_tokens=3, ignore_eos=True)
    assert plan_rows(driver.step()) == [("a", 0, 40, True)]
    assert plan_rows(driver.step()) == [("a", 40, 1, True), ("b", 0, 30, True)]
    driver.run()
    assert_pool_empty(driver)


def test_chunked_prefill_off_needs_a_budget_of_the_model_length():
    config = EngineConfig(max_num_batched_tokens=32, enable_chunked_prefill=False)
    with pytest.raises(ConfigError, match="chunked prefill"):
        Scheduler(config, 16, {EOS}, max_model_len=64)


def test_nothing_to_run_gives_no_plan():
    driver = make()
    assert driver.scheduler.schedule() is None
    assert not driver.scheduler.has_unfinished()


def test_schedule_twice_without_postprocess_is_an_error():
    driver = make()
    driver.add("a", [1, 2, 3])
    plan = driver.scheduler.schedule()
    with pytest.raises(RuntimeError, match="before postprocess"):
        driver.scheduler.schedule()
    with pytest.raises(ValueError, match="in flight"):
        driver.scheduler.postprocess(
            plan, StepResult(step_id=plan.step_id + 1, sampled_token_ids=pack_i32([1]))
        )


def test_step_ids_increase_and_new_requests_are_sent_once():
    driver = make(num_blocks=6, block_size=4, max_model_len=24)
    driver.add("a", [1] * 8, max_tokens=14, ignore_eos=True)
    driver.add("b", [2] * 8, max_tokens=14, ignore_eos=True)
    driver.run()
    assert driver.scheduler.num_preemptions > 0  # b was preempted and resumed
    assert [plan.step_id for plan in driver.plans] == list(range(len(driver.plans)))
    sent = [new.request_id for plan in driver.plans for new in plan.new_requests]
    assert sorted(sent) == ["a", "b"]
    first = driver.plans[0].new_requests[0]
    assert unpack_i32(first.prompt_token_ids).tolist() == [1] * 8 and first.params.max_tokens == 14


def test_finished_ids_are_sent_once_with_the_next_plan():
    driver = make()
    driver.add("a", [1, 2], max_tokens=1)
    driver.add("b", [3, 4], max_tokens=3, ignore_eos=True)
    driver.step()  # a finishes here
    assert driver.outputs["a"].finish_reason == FinishReason.LENGTH
    assert driver.step().finished_request_ids == ["a"]
    driver.run()
    assert all(plan.finished_request_ids != ["b"] for plan in driver.plans)
    # No plan ran since b finished; its id rides on the next plan, whenever that is.
    driver.add("c", [5], max_tokens=1)
    assert driver.step().finished_request_ids == ["b"]
    assert driver.step() is None
    driver.add("d", [5], max_tokens=1)
    assert driver.step().finished_request_ids == ["c"]
    finished = [rid for plan in driver.plans for rid in plan.finished_request_ids]
    assert finished == ["a", "b", "c"]


# ---------------------------------------------------------------- preemption and the pool


def test_preemption_recomputes_prompt_and_output_and_continues():
    driver = make(num_blocks=6, block_size=4, max_model_len=24)
    driver.add("a", [1] * 8, max_tokens=14, ignore_eos=True)
    driver.add("b", [2] * 8, max_tokens=14, ignore_eos=True)
    driver.run()
    # b (admitted last) was preempted after sampling some tokens, then recomputed from position 0
    # with its prompt and its output so far as one prefill, sampling at the end.
    resumed = [
        (plan, row) for plan in driver.plans[1:] for row in plan_rows(plan) if row[0] == "b" and row[1] == 0
    ]
    assert resumed, "b was never recomputed"
    plan, (_, _, num_tokens, samples) = resumed[0]
    assert num_tokens > 8 and samples
    assert unpack_i32(plan.token_ids).tolist()[:8] == [2] * 8
    reference = make(num_blocks=64, block_size=4, max_model_len=24)
    reference.add("a", [1] * 8, max_tokens=14, ignore_eos=True)
    reference.add("b", [2] * 8, max_tokens=14, ignore_eos=True)
    reference.run()
    assert reference.scheduler.num_preemptions == 0
    for request_id in ("a", "b"):
        assert driver.outputs[request_id].token_ids == reference.outputs[request_id].token_ids
    assert_pool_empty(driver)


def test_a_preempted_request_resumes_before_later_arrivals():
    driver = make(num_blocks=6, block_size=4, max_model_len=24)
    driver.add("a", [1] * 8, max_tokens=14, ignore_eos=True)
    driver.add("b", [2] * 8, max_tokens=14, ignore_eos=True)
    driver.step()
    driver.add("c", [3] * 8, max_tokens=2, ignore_eos=True)  # no room: waits
    while driver.scheduler.num_preemptions == 0:
        driver.step()
    assert [request.request_id for request in driver.scheduler.waiting] == ["b", "c"]
    while not (admitted := [row[0] for row in plan_rows(driver.step()) if row[1] == 0]):
        pass
    assert admitted[0] == "b"
    driver.run()
    assert_pool_empty(driver)


def test_no_admission_that_would_preempt_a_running_request_next_step():
    # a's next token starts a new block, so the 3 free blocks are not all b's to take.
    driver = make(num_blocks=4, block_size=4, max_model_len=16)
    driver.add("a", [1] * 4, max_tokens=8, ignore_eos=True)
    driver.add("b", [2] * 12, max_tokens=1, ignore_eos=True)
    assert plan_rows(driver.step()) == [("a", 0, 4, True)]
    assert driver.scheduler.num_waiting == 1
    driver.run()
    assert driver.scheduler.num_preemptions == 0
    assert_pool_empty(driver)


def test_no_admission_in_a_step_that_preempted():
    driver = make(num_blocks=4, block_size=4, max_model_len=16)
    driver.add("a", [1] * 4, max_tokens=12, ignore_eos=True)
    driver.add("b", [2] * 3, max_tokens=12, ignore_eos=True)
    while driver.scheduler.num_preemptions == 0:
        plan = driver.step()
    assert all(row[0] != "b" for row in plan_rows(plan))  # b was preempted and not readmitted
    driver.run()
    assert_pool_empty(driver)


def test_a_prompt_larger_than_the_pool_fails_cleanly():
    driver = make(num_blocks=2, block_size=4, max_model_len=64)
    driver.add("big", [1] * 9)
    driver.add("ok", [1] * 3, max_tokens=2, ignore_eos=True)
    out = driver.outputs["big"]
    assert out.finish_reason == FinishReason.ERROR and out.token_ids == []
    assert "device pool has only 2 blocks" in out.error
    driver.run()
    assert driver.outputs["ok"].finish_reason == FinishReason.LENGTH
    assert_pool_empty(driver)


def test_a_generation_outgrowing_the_pool_fails_cleanly_and_others_proceed():
    driver = make(num_blocks=3, block_size=4, max_model_len=64)
    driver.add("grow", [1] * 6, max_tokens=40, ignore_eos=True)
    driver.add("small", [2] * 2, max_tokens=3, ignore_eos=True)
    driver.run()
    grow = driver.outputs["grow"]
    # 12 tokens fill the pool; the 13th would need a 4th block even with "small" preempted.
    assert grow.finish_reason == FinishReason.ERROR and len(grow.token_ids) == 13 - 6
    assert "needs 4 KV blocks for its 13 tokens" in grow.error
    assert driver.outputs["small"].finish_reason == FinishReason.LENGTH
    assert_pool_empty(driver)


def test_over_long_and_empty_prompts_fail_cleanly():
    driver = make(max_model_len=8)
    driver.add("long", [1] * 9)
    driver.add("empty", [])
    assert driver.outputs["long"].finish_reason == FinishReason.ERROR
    assert "model length 8" in driver.outputs["long"].error
    assert driver.outputs["empty"].error == "the prompt is empty."
    assert not driver.scheduler.has_unfinished()


def test_duplicate_request_ids_are_rejected():
    driver = make()
    driver.add("a", [1])
    with pytest.raises(ValueError, match="already in use"):
        driver.add("a", [1])


# ---------------------------------------------------------------- stop checks


def scripted(tokens: list[int], max_model_len: int = 64, **params) -> Output:
    driver = make(script={"r": tokens}, eos_token_ids={EOS, 49}, max_model_len=max_model_len)
    driver.add("r", [10, 11, 12], **params)
    driver.run()
    assert_pool_empty(driver)
    return driver.outputs["r"]


def test_eos_stops_and_is_included():
    out = scripted([5, 6, 0, 7], max_tokens=10)
    assert (out.token_ids, out.finish_reason, out.stop_token_id) == ([5, 6, 0], FinishReason.STOP, 0)
    out = scripted([5, 49, 7], max_tokens=10)  # any of the model's eos ids
    assert (out.token_ids, out.stop_token_id) == ([5, 49], 49)


def test_stop_token_ids_stop_even_with_ignore_eos():
    out = scripted([5, 0, 8, 9], max_tokens=10, ignore_eos=True, stop_token_ids=[8])
    assert (out.token_ids, out.finish_reason, out.stop_token_id) == ([5, 0, 8], FinishReason.STOP, 8)


def test_ignore_eos_runs_to_max_tokens():
    out = scripted([0, 0, 0, 0], max_tokens=4, ignore_eos=True)
    assert (out.token_ids, out.finish_reason, out.stop_token_id) == ([0, 0, 0, 0], FinishReason.LENGTH, -1)


def test_min_tokens_defers_stop_tokens():
    # With min_tokens=2 a stop token counts only once 2 outputs came before it.
    out = scripted([0, 8, 0, 5], max_tokens=10, min_tokens=2, stop_token_ids=[8])
    assert (out.token_ids, out.finish_reason, out.stop_token_id) == ([0, 8, 0], FinishReason.STOP, 0)


def test_max_tokens_gives_length():
    out = scripted([5, 6, 7, 8], max_tokens=3)
    assert (out.token_ids, out.finish_reason) == ([5, 6, 7], FinishReason.LENGTH)


def test_a_stop_token_at_max_tokens_is_a_stop():
    out = scripted([5, 6, 0], max_tokens=3)
    assert (out.finish_reason, out.stop_token_id) == (FinishReason.STOP, 0)


def test_max_model_len_gives_length():
    out = scripted([5] * 20, max_model_len=8, max_tokens=None)
    assert (out.token_ids, out.finish_reason) == ([5] * 5, FinishReason.LENGTH)
    out = scripted([5] * 20, max_model_len=8, max_tokens=100, min_tokens=50)
    assert (out.token_ids, out.finish_reason) == ([5] * 5, FinishReason.LENGTH)


def test_deltas_carry_prompt_length_trace_context_and_logprobs():
    driver = make(logprobs=True)
    driver.add("r", [1, 2, 3], max_tokens=2, ignore_eos=True, trace_context="00-abc-def-01")
    driver.run()
    deltas = driver.outputs["r"].deltas
    assert len(deltas) == 2
    assert all(d.num_prompt_tokens == 3 and d.trace_context == "00-abc-def-01" for d in deltas)
    tokens = driver.outputs["r"].token_ids
    assert [d.logprobs[0].logprob for d in deltas] == [-float(t) for t in tokens]


def test_an_executor_error_fails_the_requests_of_that_step():
    driver = make(max_num_seqs=1)
    driver.add("a", [1, 2], max_tokens=4, ignore_eos=True)
    driver.add("b", [3, 4], max_tokens=4, ignore_eos=True)  # waiting: not in the failed step
    plan = driver.scheduler.schedule()
    assert plan.request_ids == ["a"]
    driver.executor.execute(plan)  # then fails: the result says so
    result = StepResult(step_id=plan.step_id, sampled_token_ids=b"", error="boom")
    driver.collect(driver.scheduler.postprocess(plan, result))
    assert driver.outputs["a"].finish_reason == FinishReason.ERROR and "boom" in driver.outputs["a"].error
    driver.run()
    assert driver.outputs["b"].finish_reason == FinishReason.LENGTH
    assert_pool_empty(driver)


def test_a_result_with_the_wrong_number_of_tokens_fails_the_step():
    driver = make()
    driver.add("a", [1, 2], max_tokens=4, ignore_eos=True)
    plan = driver.scheduler.schedule()
    driver.executor.execute(plan)
    result = StepResult(step_id=plan.step_id, sampled_token_ids=pack_i32([1, 2]))
    driver.collect(driver.scheduler.postprocess(plan, result))
    assert driver.outputs["a"].finish_reason == FinishReason.ERROR
    assert "2 tokens for 1 samples" in driver.outputs["a"].error
    assert_pool_empty(driver)


# ---------------------------------------------------------------- aborts


def test_abort_a_waiting_request():
    driver = make(max_num_seqs=1)
    driver.add("a", [1, 2], max_tokens=3, ignore_eos=True)
    driver.add("b", [1, 2], max_tokens=3, ignore_eos=True)
    driver.step()
    assert driver.scheduler.num_waiting == 1
    driver.collect(driver.scheduler.abort_requests(["b", "unknown"]))
    assert driver.outputs["b"].finish_reason == FinishReason.ABORT and driver.outputs["b"].token_ids == []
    assert driver.outputs["b"].deltas[0].num_prompt_tokens == 2
    driver.run()
    assert "b" not in [rid for plan in driver.plans for rid in plan.request_ids]
    assert all("b" not in plan.finished_request_ids for plan in driver.plans)  # executor never knew it
    assert_pool_empty(driver)


def test_abort_a_running_request_frees_its_blocks_at_once():
    driver = make()
    driver.add("a", [1] * 10, max_tokens=30, ignore_eos=True)
    driver.add("b", [1] * 10, max_tokens=3, ignore_eos=True)
    driver.step()
    driver.step()
    used = driver.scheduler.block_manager.num_used
    driver.collect(driver.scheduler.abort_requests(["a"]))
    assert driver.scheduler.block_manager.num_used < used
    assert driver.outputs["a"].finish_reason == FinishReason.ABORT
    assert len(driver.outputs["a"].token_ids) == 2
    assert driver.step().finished_request_ids == ["a"]
    driver.collect(driver.scheduler.abort_requests(["a"]))  # a second abort is ignored
    driver.run()
    assert_pool_empty(driver)


def test_abort_while_its_step_runs_ignores_its_result():
    driver = make()
    driver.add("a", [1] * 5, max_tokens=30, ignore_eos=True)
    driver.add("b", [2] * 5, max_tokens=30, ignore_eos=True)
    driver.step()
    driver.step(mid_step=lambda: driver.collect(driver.scheduler.abort_requests(["a"])))
    assert driver.outputs["a"].finish_reason == FinishReason.ABORT
    assert len(driver.outputs["a"].token_ids) == 1  # the token sampled in the aborted step is dropped
    assert len(driver.outputs["b"].token_ids) == 2
    driver.collect(driver.scheduler.abort_requests(["b"]))
    assert_pool_empty(driver)


def test_abort_a_preempted_request():
    driver = make(num_blocks=6, block_size=4, max_model_len=24)
    driver.add("a", [1] * 8, max_tokens=14, ignore_eos=True)
    driver.add("b", [2] * 8, max_tokens=14, ignore_eos=True)
    while driver.scheduler.num_preemptions == 0:
        driver.step()
    assert driver.scheduler.requests["b"].status == RequestStatus.WAITING
    driver.collect(driver.scheduler.abort_requests(["b"]))
    assert driver.outputs["b"].finish_reason == FinishReason.ABORT
    assert driver.step().finished_request_ids == ["b"]  # the executor still had its state
    driver.run()
    assert_pool_empty(driver)


# ---------------------------------------------------------------- random workloads


def reference_output(prompt: list[int], params: dict, max_model_len: int, pool_tokens: int) -> Output:
    """What one request must produce, computed without any scheduler."""
    stop_ids = set(params.get("stop_token_ids", []))
    if not params.get("ignore_eos", False):
        stop_ids.add(EOS)
    max_tokens = params.get("max_tokens")
    if len(prompt) > pool_tokens:
        return Output(finish_reason=FinishReason.ERROR)
    tokens = list(prompt)
    out = Output()
    while True:
        token = next_token(tokens)
        tokens.append(token)
        out.token_ids.append(token)
        if token in stop_ids and len(out.token_ids) > params.get("min_tokens", 0):
            out.finish_reason, out.stop_token_id = FinishReason.STOP, token
        elif (max_tokens is not None and len(out.token_ids) >= max_tokens) or len(tokens) >= max_model_len:
            out.finish_reason = FinishReason.LENGTH
        elif len(tokens) > pool_tokens:
            out.finish_reason = FinishReason.ERROR
        if out.finish_reason is not None:
            return out


request_strategy = st.fixed_dictionaries(
    {
        "prompt": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
        "max_tokens": st.one_of(st.none(), st.integers(1, 24)),
        "min_tokens": st.integers(0, 3),
        "ignore_eos": st.booleans(),
        "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=2),
        "arrival_step": st.integers(0, 12),
        # Mostly not aborted, so that most requests live long enough to be preempted.
        "abort_step": st.one_of(st.none(), st.none(), st.none(), st.integers(0, 40)),
        "abort_mid_step": st.booleans(),
    }
)


def request_params(request: dict) -> dict:
    params = {key: request[key] for key in ("max_tokens", "min_tokens", "ignore_eos", "stop_token_ids")}
    if params["max_tokens"] is not None:
        params["min_tokens"] = min(params["min_tokens"], params["max_tokens"])
    return params


def run_workload(
    requests: list[dict], config: dict, num_blocks: int, host_leases: dict[int, int] | None = None
) -> Driver:
    """Requests arrive and are aborted (between steps or while a step runs) at given step numbers;
    ``host_leases`` sets the host lease before given steps. Like the memory manager's controller, a
    stalled engine (nothing to run) gets the whole host pool back."""
    driver = make(num_blocks=num_blocks, **config)
    scheduler = driver.scheduler
    host_leases = host_leases or {}
    last_arrival = max(request["arrival_step"] for request in requests)
    num_steps = 0
    while num_steps <= last_arrival or driver.scheduler.has_unfinished():
        if num_steps in host_leases:
            scheduler.set_host_lease(host_leases[num_steps])
        for i, request in enumerate(requests):
            if request["arrival_step"] == num_steps:
                driver.add(f"r{i}", request["prompt"], **request_params(request))
        aborts = {False: [], True: []}
        for i, request in enumerate(requests):
            if request["abort_step"] == num_steps:
                aborts[request["abort_mid_step"]].append(f"r{i}")
        driver.collect(driver.scheduler.abort_requests(aborts[False]))
        during = aborts[True]
        plan = driver.step(
            mid_step=lambda during=during: driver.collect(driver.scheduler.abort_requests(during))
        )
        if plan is None:
            driver.collect(driver.scheduler.abort_requests(during))
            if scheduler.has_unfinished():
                scheduler.set_host_lease(scheduler.num_host_blocks)
        else:
            rows = plan_rows(plan)
            assert sum(num for _, _, num, _ in rows) <= config["max_num_batched_tokens"]
            assert len(rows) <= config["max_num_seqs"]
            if not config["enable_chunked_prefill"]:
                assert all(samples for *_, samples in rows), "a prefill was chunked"
        num_steps += 1
        assert num_steps < 5_000, "the scheduler did not finish"
    return driver


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_strategy, min_size=1, max_size=10),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 48),
    enable_chunked_prefill=st.booleans(),
    spare_blocks=st.integers(-3, 3),
    prefix_caching=st.booleans(),
)
def test_outputs_do_not_depend_on_the_pool_size(
    requests, block_size, max_num_seqs, budget, enable_chunked_prefill, spare_blocks, prefix_caching
):
    max_model_len = 48
    config = dict(
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget if enable_chunked_prefill else max_model_len,
        enable_chunked_prefill=enable_chunked_prefill,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix_caching,
    )
    requests = [dict(request, prompt=request["prompt"][: max_model_len - 1]) for request in requests]
    # Tiny: about one request's worth of blocks, so requests preempt each other all the time, and
    # sometimes less, so the largest must fail with ERROR (at a point the reference predicts).
    # Huge: everything fits at once.
    peak = max(
        min(len(r["prompt"]) + (r["max_tokens"] or max_model_len), max_model_len) - 1 for r in requests
    )
    tiny_blocks = max(1, -(-peak // block_size) + spare_blocks)
    huge_blocks = len(requests) * -(-max_model_len // block_size)
    runs = {
        num_blocks: run_workload(requests, config, num_blocks) for num_blocks in (tiny_blocks, huge_blocks)
    }
    for num_blocks, driver in runs.items():
        for i, request in enumerate(requests):
            params = request_params(request)
            reference = reference_output(request["prompt"], params, max_model_len, num_blocks * block_size)
            out = driver.outputs[f"r{i}"]
            if out.finish_reason == FinishReason.ABORT:
                assert request["abort_step"] is not None
                assert out.token_ids == reference.token_ids[: len(out.token_ids)]
                assert len(out.token_ids) < len(reference.token_ids)
            else:
                assert (out.token_ids, out.finish_reason, out.stop_token_id) == (
                    reference.token_ids,
                    reference.finish_reason,
                    reference.stop_token_id,
                )
        assert_pool_empty(driver)
        assert driver.executor.dropped <= driver.executor.ever_seen
    tiny, huge = runs[tiny_blocks], runs[huge_blocks]
    event(f"tiny pool preempted: {tiny.scheduler.num_preemptions > 0}")
    for out in tiny.outputs.values():
        event(f"tiny pool finish reason: {out.finish_reason!s}")
    for i in range(len(requests)):
        a, b = tiny.outputs[f"r{i}"], huge.outputs[f"r{i}"]
        if not {a.finish_reason, b.finish_reason} & {FinishReason.ABORT, FinishReason.ERROR}:
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)


# ---------------------------------------------------------------- speed (printed, not asserted)


def test_decode_step_overhead_at_batch_256(capsys):
    driver = make(
        num_blocks=256 * 64, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096
    )
    scheduler = driver.scheduler
    for i in range(256):
        driver.add(f"r{i}", [i % VOCAB] * 512, max_tokens=1000, ignore_eos=True)
    while any(
        request.num_computed_tokens < request.num_prompt_tokens for request in scheduler.requests.values()
    ):
        driver.step()
    sampled = pack_i32(np.arange(256) % VOCAB)
    num_steps = 200
    elapsed = 0.0
    for _ in range(num_steps):
        start = time.perf_counter()
        plan = scheduler.schedule()
        result = StepResult(step_id=plan.step_id, sampled_token_ids=sampled)
        deltas = scheduler.postprocess(plan, result)
        elapsed += time.perf_counter() - start
        assert len(plan.request_ids) == len(deltas) == 256
    with capsys.disabled():
        print(f"\nschedule+postprocess at batch 256 decode: {elapsed / num_steps * 1e3:.3f} ms/step")
