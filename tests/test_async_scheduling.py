"""Async scheduling (``--async-scheduling``): the scheduler plans step t+1 while step t runs, with
placeholders for step t's tokens that the executor fills in. The output must be exactly the
synchronous engine's, and no KV block may leak when a request stops or is aborted mid-pipeline.

Three levels: the executor's placeholder substitution on its own; the scheduler pipelined against the
fake executor of ``test_scheduler`` (its model reads the context back through the block tables, so a
wrong position, block or copy changes the output), over random workloads with preemption, swaps,
host pooling, prefix caching, stop tokens and aborts; and the whole engine with a tiny model, in
threads (``pied.LLM``) and in worker processes, sync and async side by side.
"""

from __future__ import annotations

import asyncio
import collections

import msgspec
import numpy as np
import pytest
from engine_driver import BLOCK_SIZE, assert_all_free, assert_tokens_match, collect, drive, running_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_scheduler import EOS, Driver, FakeExecutor, check_plan_against_tiers, make

import proto
from proto import PLACEHOLDER_TOKEN_ID, StepPlan, StepResult, pack_i32, unpack_i32
from workers.executor.token_feedback import SampledTokenFeedback

# ---------------------------------------------------------------- the executor's substitution


def plan_of(step_id: int, request_ids: list[str], query_lens: list[int], token_ids: list[int]) -> StepPlan:
    num_requests = len(request_ids)
    return StepPlan(
        step_id=step_id,
        request_ids=request_ids,
        num_scheduled_tokens=pack_i32(query_lens),
        token_ids=pack_i32(token_ids),
        start_positions=pack_i32([0] * num_requests),
        num_blocks=pack_i32([0] * num_requests),
        block_tables=b"",
        sample=bytes([1] * num_requests),
    )


def fill(feedback: SampledTokenFeedback, plan: StepPlan) -> list[int]:
    token_ids = unpack_i32(plan.token_ids)
    return feedback.fill(plan, token_ids, unpack_i32(plan.num_scheduled_tokens)).tolist()


def test_placeholders_take_the_tokens_the_step_before_sampled_for_their_requests():
    feedback = SampledTokenFeedback()
    feedback.record(6, ["a", "b", "c"], [11, 22, 33])
    # "n" is new (a prompt chunk), "c" decodes a known token, "b" and "a" decode on placeholders.
    plan = plan_of(7, ["b", "n", "c", "a"], [1, 3, 1, 1], [-1, 5, 6, 7, 40, -1])
    assert fill(feedback, plan) == [22, 5, 6, 7, 40, 11]
    # A plan without placeholders is passed through as it is (no copy).
    plain = plan_of(7, ["a"], [2], [3, 4])
    token_ids = unpack_i32(plain.token_ids)
    assert feedback.fill(plain, token_ids, unpack_i32(plain.num_scheduled_tokens)) is token_ids


def test_a_placeholder_the_last_step_cannot_fill_is_an_error():
    feedback = SampledTokenFeedback()
    feedback.record(3, ["a"], [9])
    with pytest.raises(ValueError, match="sampled none for it"):
        fill(feedback, plan_of(4, ["b"], [1], [PLACEHOLDER_TOKEN_ID]))
    with pytest.raises(ValueError, match="more than that one token"):
        fill(feedback, plan_of(4, ["a"], [2], [PLACEHOLDER_TOKEN_ID, 5]))
    with pytest.raises(ValueError, match="the last step run was 3"):
        fill(feedback, plan_of(5, ["a"], [1], [PLACEHOLDER_TOKEN_ID]))


# ---------------------------------------------------------------- the scheduler, pipelined


class FeedbackExecutor(FakeExecutor):
    """The fake executor, filling a plan's placeholders from its own last samples as the real one
    does (and checking that each is exactly the token its request sampled in the step before)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_sampled: dict[str, int] = {}
        self.num_placeholders = 0

    def execute(self, plan: StepPlan, held_block_ids: set[int] | None = None) -> StepResult:
        token_ids = unpack_i32(plan.token_ids).copy()
        holes = np.flatnonzero(token_ids == PLACEHOLDER_TOKEN_ID)
        if len(holes):
            owners = np.repeat(np.arange(len(plan.request_ids)), unpack_i32(plan.num_scheduled_tokens))
            for hole in holes.tolist():
                token_ids[hole] = self.last_sampled[plan.request_ids[owners[hole]]]
            self.num_placeholders += len(holes)
            plan = msgspec.structs.replace(plan, token_ids=pack_i32(token_ids))
        result = super().execute(plan, held_block_ids)
        sampled_ids = [rid for rid, flag in zip(plan.request_ids, plan.sample) if flag]
        self.last_sampled = dict(zip(sampled_ids, unpack_i32(result.sampled_token_ids).tolist()))
        return result


class PipelinedDriver(Driver):
    """The async engine loop: plan step t+1, then run and postprocess step t."""

    def __init__(self, driver: Driver) -> None:
        super().__init__(driver.scheduler, driver.executor)
        self.in_flight: collections.deque[tuple[StepPlan, set[int]]] = collections.deque()

    def step(self, mid_step=None) -> StepPlan | None:
        plan = self.scheduler.schedule() if self.scheduler.can_schedule() else None
        if plan is not None:
            check_plan_against_tiers(self.scheduler, plan)
            self.plans.append(plan)
            held = {b for request in self.scheduler.requests.values() for b in request.block_table}
            self.in_flight.append((plan, held))
        if self.in_flight and (plan is None or len(self.in_flight) == 2):
            oldest, held = self.in_flight.popleft()
            self.collect(self.scheduler.postprocess(oldest, self.executor.execute(oldest, held)))
            return oldest
        return plan

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished() and not self.in_flight:
                return
            assert self.step() is not None, "unfinished requests but nothing scheduled"
        raise AssertionError("the scheduler did not finish (deadlock or livelock)")


POOLS = {
    "none": dict(num_blocks=24),
    "swap": dict(num_blocks=24, kv_policy="swap", num_host_blocks=24),
    "pie": dict(num_blocks=12, kv_policy="pie", num_host_blocks=40),
}


def driver_for(pipelined: bool, script: dict[str, list[int]] | None = None, **pool) -> Driver:
    driver = make(script=script, **pool)
    if not pipelined:
        return driver
    driver.scheduler.max_steps_in_flight = 2  # as config.async_scheduling sets it
    executor = driver.executor
    driver.executor = FeedbackExecutor(
        executor.num_device_blocks, executor.block_size, script, False, executor.num_host_blocks
    )
    return PipelinedDriver(driver)


def run_workload(driver: Driver, requests: list[dict], abort_after: dict[int, list[str]]) -> None:
    """Add every request, then step; ``abort_after[k]``: ids aborted once k steps were processed."""
    for request in requests:
        driver.add(request["id"], request["prompt"], max_tokens=request["max_tokens"])
    for step in range(10_000):
        for request_id in abort_after.get(step, []):
            driver.collect(driver.scheduler.abort_requests([request_id]))
        if not driver.scheduler.has_unfinished() and not getattr(driver, "in_flight", None):
            return
        assert driver.step() is not None, "unfinished requests but nothing scheduled"
    raise AssertionError("the scheduler did not finish")


def assert_nothing_held(driver: Driver) -> None:
    scheduler = driver.scheduler
    assert not scheduler.has_unfinished() and scheduler.num_steps_in_flight == 0
    assert scheduler.block_manager.num_used == 0 and scheduler.num_host_blocks_used == 0
    assert scheduler.block_manager.num_free == scheduler.block_manager.num_blocks


workloads = st.lists(
    st.fixed_dictionaries(
        {
            "prompt": st.lists(st.integers(1, 49), min_size=1, max_size=30),
            "max_tokens": st.integers(1, 24),
        }
    ),
    min_size=1,
    max_size=7,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=workloads,
    pool=st.sampled_from(sorted(POOLS)),
    prefix_caching=st.booleans(),
    chunk=st.sampled_from([8, 64]),
    aborts=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 12)), max_size=2),
)
def test_pipelined_scheduler_gives_the_synchronous_output(workload, pool, prefix_caching, chunk, aborts):
    # Shared prompt heads, so prefix caching has something to find.
    requests = [
        dict(
            id=str(i),
            prompt=([7, 8, 9, 10, 11] if i % 2 else []) + request["prompt"],
            max_tokens=request["max_tokens"],
        )
        for i, request in enumerate(workload)
    ]
    abort_after: dict[int, list[str]] = {}
    for index, step in aborts:
        if index < len(requests):
            abort_after.setdefault(step, []).append(requests[index]["id"])
    outputs = {}
    for pipelined in (False, True):
        driver = driver_for(
            pipelined,
            **POOLS[pool],
            max_num_batched_tokens=chunk,
            max_model_len=96,
            enable_prefix_caching=prefix_caching,
        )
        run_workload(driver, requests, abort_after)
        assert_nothing_held(driver)
        outputs[pipelined] = {
            request_id: (output.token_ids, output.finish_reason)
            for request_id, output in driver.outputs.items()
        }
    assert_tokens_match(outputs[True], outputs[False])


def test_the_pipeline_is_used_and_a_request_stopping_mid_pipeline_wastes_one_row():
    """A stop token at step t: step t+1 (planned already) computes a row for it that is dropped;
    max_tokens ending at step t is known in advance, so no row is planned after it."""
    script = {"stops": [5, 6, EOS, 3, 3, 3], "runs": [4] * 5}
    sync = driver_for(False, script)
    pipelined = driver_for(True, script)
    assert isinstance(pipelined, PipelinedDriver) and isinstance(pipelined.executor, FeedbackExecutor)
    for driver in (sync, pipelined):
        driver.add("stops", [1, 2, 3], max_tokens=6)
        driver.add("runs", [4, 5], max_tokens=5)
        driver.run()
        assert driver.outputs["stops"].token_ids == [5, 6, EOS]
        assert driver.outputs["stops"].finish_reason == proto.FinishReason.STOP
        assert driver.outputs["runs"].token_ids == [4] * 5
        assert_nothing_held(driver)
    rows = collections.Counter(rid for plan in pipelined.plans for rid in plan.request_ids)
    assert rows == {"stops": 4, "runs": 5}  # one wasted row after the stop token, none after max_tokens
    assert pipelined.executor.num_placeholders == 4 + 3  # every decode after the first one
    assert collections.Counter(rid for plan in sync.plans for rid in plan.request_ids) == {
        "stops": 3,
        "runs": 5,
    }


def test_a_request_preempted_while_its_token_is_in_flight_keeps_that_token():
    """A tiny pool preempts at almost every step; a preempted request's in-flight token is filled in
    where it waits, and it is not admitted again before it has it."""
    requests = [dict(id=str(i), prompt=[1 + i, 2, 3, 4, 5, 6], max_tokens=20) for i in range(4)]
    outputs = {}
    for pipelined in (False, True):
        driver = driver_for(pipelined, num_blocks=10)  # room for about two requests at once
        run_workload(driver, requests, {})
        assert driver.scheduler.num_preemptions > 0
        assert_nothing_held(driver)
        outputs[pipelined] = {rid: out.token_ids for rid, out in driver.outputs.items()}
    assert outputs[True] == outputs[False]


# ---------------------------------------------------------------- the engine, sync and async

PROMPTS = {
    "0": [1, 17, 99, 3, 250],
    "1": [1] + list(range(40, 77)),
    "2": [1] + [(i * 37) % 500 + 5 for i in range(50)],
    "3": [1, 17, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13],  # shares blocks with "0"
    "4": [1, 5, 6],
}
MAX_TOKENS = 16
TIGHT = dict(device_kv_blocks=20)
POLICIES = {
    "none": TIGHT,
    "swap": dict(TIGHT, kv_policy="swap", expansion="fixed:64", host_kv_gib=0.01),
    "pie": dict(TIGHT, kv_policy="pie", expansion="fixed:64"),
}


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


def llm_outputs(
    model_dir, async_scheduling: bool, requests: list[tuple[list[int], proto.SamplingParams]], **engine
):
    from pied.llm import LLM

    with LLM(
        str(model_dir), dtype="float32", block_size=BLOCK_SIZE, async_scheduling=async_scheduling, **engine
    ) as llm:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p, _ in requests], [params for _, params in requests]
        )
        assert_all_free(llm.engine)
        stats = llm.engine.stats()
    return [
        [(c.token_ids, c.finish_reason, c.stop_reason) for c in output.outputs] for output in outputs
    ], stats


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_llm_tokens_equal_with_async_scheduling_on_and_off(llama, policy):
    """Greedy (ignore_eos and max_tokens), a stop token met mid-stream, n > 1 seeded choices and a
    stop string, through pied.LLM, under each KV policy at a device budget that preempts (and, under
    pie, keeps most KV on host)."""
    greedy = [
        (prompt, proto.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        for prompt in PROMPTS.values()
    ]
    reference, _ = llm_outputs(llama, False, greedy, **POLICIES[policy])
    # A stop token that the greedy output of prompt 1 meets half way, a stop string from prompt 2's text.
    stop_token = reference[1][0][0][MAX_TOKENS // 2]
    from pied.tokenizer import Tokenizer

    text = Tokenizer.from_folder(llama).decode(reference[2][0][0])
    stop_string = text[len(text) // 2 : len(text) // 2 + 3]
    requests = greedy + [
        (
            PROMPTS["1"],
            proto.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_token]),
        ),
        (
            PROMPTS["2"],
            proto.SamplingParams(
                temperature=0, max_tokens=MAX_TOKENS, stop=[stop_string] if stop_string.strip() else []
            ),
        ),
        (PROMPTS["0"], proto.SamplingParams(temperature=0.9, top_p=0.9, seed=5, n=3, max_tokens=MAX_TOKENS)),
        (
            PROMPTS["3"],
            proto.SamplingParams(temperature=1.0, seed=11, max_tokens=MAX_TOKENS, presence_penalty=0.5),
        ),
    ]
    outputs = {}
    for async_scheduling in (False, True):
        outputs[async_scheduling], stats = llm_outputs(llama, async_scheduling, requests, **POLICIES[policy])
        assert stats.num_preemptions > 0 or policy == "pie"
    assert outputs[True] == outputs[False]
    assert [choices[0][0] for choices in outputs[True][: len(greedy)]] == [c[0][0] for c in reference]
    assert outputs[True][len(greedy)][0][1] == "stop"  # the stop token ended it mid-stream


async def test_worker_processes_give_the_same_tokens_with_aborts_mid_stream(llama):
    """Through worker processes under pie (most KV on host): arrivals while others decode and aborts
    mid-stream; afterwards no block of either tier is held."""
    workload = [
        dict(id=rid, prompt=prompt, max_tokens=MAX_TOKENS, arrival=4 * int(rid), abort_at=None)
        for rid, prompt in PROMPTS.items()
    ]
    workload[2]["abort_at"] = 14
    workload[4]["abort_at"] = 24
    outputs = {}
    for async_scheduling in (False, True):
        async with running_engine(
            llama, workers="processes", async_scheduling=async_scheduling, **POLICIES["pie"]
        ) as engine:
            outputs[async_scheduling] = await asyncio.wait_for(drive(engine, workload), 300)
            stats = await engine.wait_idle()
            assert stats.device_usage == 0.0 and stats.host_usage == 0.0
            assert stats.num_running == stats.num_waiting == 0 and stats.bytes_to_device_total > 0
    assert_tokens_match(outputs[True], outputs[False])


async def test_abort_and_stop_mid_pipeline_leak_no_block(llama):
    """Threads, async on: requests stopped by a stop token and aborted while a step is planned ahead
    give back every block (device and host) and every executor state."""
    async with running_engine(llama, async_scheduling=True, **POLICIES["pie"]) as engine:
        scheduler = engine.actor("scheduler").scheduler
        assert scheduler.max_steps_in_flight == 2
        runner = engine.actor("executor").runner
        free_before = scheduler.block_manager.num_free
        params = proto.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        streams = {
            rid: engine.add_request(proto.AddRequest(rid, pack_i32(prompt), params))
            for rid, prompt in PROMPTS.items()
        }
        first = {rid: aiter(stream) for rid, stream in streams.items()}
        for rid in ("1", "3"):
            await asyncio.wait_for(anext(first[rid]), 60)  # decoding: a plan is in flight behind it
        await engine.abort(["1", "3"])
        results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in first.values())), 120)
        reasons = {rid: last.finish_reason for rid, (_, last) in zip(first, results)}
        assert reasons["1"] == reasons["3"] == proto.FinishReason.ABORT
        stop = proto.SamplingParams(
            temperature=0, max_tokens=40, stop_token_ids=list(range(512)), min_tokens=3
        )
        tokens, last = await asyncio.wait_for(
            collect(engine.add_request(proto.AddRequest("stop", pack_i32(PROMPTS["2"]), stop))), 60
        )
        assert last.finish_reason == proto.FinishReason.STOP and len(tokens) == 4
        await engine.wait_idle()
        assert_all_free(engine)
        assert scheduler.block_manager.num_free == free_before
        assert scheduler.num_steps_in_flight == 0
        # The executor dropped every finished request's state with a later plan, or keeps at most
        # those of the last step (their ids ride on the next plan).
        assert set(runner.states) <= {"stop"}


def test_llm_grammar_logprobs_and_prompt_logprobs_equal_with_async_scheduling(llama):
    """What the executor tracks per request (a grammar's state, prompt logprob rows over a chunked
    prompt) needs no synchronous step: the executor sees every token it sampled, in order."""
    grammar = proto.GrammarConstraint(proto.GrammarKind.EBNF, 'root ::= "(" [0-9]+ ")"')
    requests = [
        (
            PROMPTS["1"],
            proto.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=2, logprobs=2),
        ),
        (PROMPTS["0"], proto.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, grammar=grammar)),
        (PROMPTS["2"], proto.SamplingParams(temperature=0.8, seed=3, max_tokens=MAX_TOKENS, grammar=grammar)),
    ]
    from pied.llm import LLM

    results = {}
    for async_scheduling in (False, True):
        with LLM(
            str(llama),
            dtype="float32",
            block_size=BLOCK_SIZE,
            async_scheduling=async_scheduling,
            max_num_batched_tokens=8,
        ) as llm:
            outputs = llm.generate(
                [{"prompt_token_ids": p} for p, _ in requests], [params for _, params in requests]
            )
            assert_all_free(llm.engine)
        results[async_scheduling] = [
            (o.prompt_logprobs, [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs])
            for o in outputs
        ]
    for (prompt_async, choices_async), (prompt_sync, choices_sync) in zip(results[True], results[False]):
        assert [c[:3] for c in choices_async] == [c[:3] for c in choices_sync]
        # Values to float32 rounding: a wasted row changes the batch a step's matmuls run over.
        assert_logprobs_close(prompt_async, prompt_sync)
        for choice_async, choice_sync in zip(choices_async, choices_sync):
            assert_logprobs_close(choice_async[3], choice_sync[3])
    prompt_logprobs, [(_, _, _, logprobs)] = results[True][0]
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(PROMPTS["1"]) and logprobs
    for _, [(_, text, reason, _)] in results[True][1:]:
        assert text.startswith("(") and (reason == "length" or text.endswith(")")), text


def assert_logprobs_close(got, expected) -> None:
    """Logprob dicts (token -> vLLM's Logprob) with the same tokens, ranks and texts, values to 1e-4."""
    if got is None or expected is None:
        assert got is expected
        return
    assert len(got) == len(expected)
    for row, expected_row in zip(got, expected):
        if row is None or expected_row is None:
            assert row is expected_row
            continue
        assert row.keys() == expected_row.keys()
        for token, value in row.items():
            expected_value = expected_row[token]
            assert (value.rank, value.decoded_token) == (expected_value.rank, expected_value.decoded_token)
            assert value.logprob == pytest.approx(expected_value.logprob, abs=1e-4)


def test_the_runner_fills_placeholders_with_the_tokens_it_sampled(llama):
    """Step 1 planned ahead (placeholders) runs exactly as step 1 planned after step 0's tokens."""
    from step_plans import Chunk, make_plan, new_request

    from proto.config import EngineConfig
    from workers.executor.runner import ModelRunner

    config = EngineConfig(
        model=str(llama), dtype="float32", device="cpu", block_size=BLOCK_SIZE, device_kv_blocks=16
    )
    prompts = {"a": [1, 17, 99, 3, 250], "b": [1, 5, 6]}
    blocks = {"a": [3, 7], "b": [5]}
    first = make_plan(
        [Chunk(rid, prompt, 0, blocks[rid]) for rid, prompt in prompts.items()],
        step_id=0,
        new_requests=[
            new_request(rid, prompt, temperature=0, max_tokens=8) for rid, prompt in prompts.items()
        ],
    )
    results = []
    for ahead in (False, True):
        runner = ModelRunner(config)
        sampled = unpack_i32(runner.execute(first).sampled_token_ids).tolist()
        tokens = [PLACEHOLDER_TOKEN_ID] * 2 if ahead else sampled
        second = make_plan(
            [Chunk(rid, [token], len(prompts[rid]), blocks[rid]) for rid, token in zip(prompts, tokens)],
            step_id=1,
        )
        results.append((sampled, unpack_i32(runner.execute(second).sampled_token_ids).tolist()))
        if ahead:
            # A placeholder in a plan that does not follow the step it refers to: a clear error.
            late = msgspec.structs.replace(second, step_id=3)
            with pytest.raises(ValueError, match="placeholders but the last step run was 1"):
                runner.execute(late)
        runner.close()
    assert results[0] == results[1]
