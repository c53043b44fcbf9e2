"""ModelRunner.execute: StepPlan in, StepResult out; sampling state lifecycle; KV pool sizing."""

from __future__ import annotations

import msgspec
import pytest
import torch
from step_plans import Chunk, make_plan, new_request
from tiny_models import load_hf_model

import proto
from proto.config import ConfigError, EngineConfig
from workers import plan as plan_module
from workers.executor.kv_pool import GIB, kv_bytes_per_block
from workers.executor.runner import ModelRunner

BLOCK_SIZE = 4


def make_runner(path, **overrides) -> ModelRunner:
    settings = dict(
        model=str(path), dtype="float32", device="cpu", block_size=BLOCK_SIZE, device_kv_blocks=32
    )
    return ModelRunner(EngineConfig(**(settings | overrides)))


@pytest.fixture(scope="module")
def llama_path(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture
def runner(llama_path):
    return make_runner(llama_path)


def test_greedy_generation_matches_transformers(runner, llama_path):
    prompt = [1, 17, 99, 3, 250, 41, 7]
    hf = load_hf_model(llama_path)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[
            0, len(prompt) :
        ].tolist()
    blocks = [9, 3, 30, 12]
    params = dict(temperature=0.0, max_tokens=8)
    result = runner.execute(
        make_plan([Chunk("r", prompt, 0, blocks)], 0, [new_request("r", prompt, **params)])
    )
    tokens = proto.unpack_i32(result.sampled_token_ids).tolist()
    for step in range(1, 8):
        position = len(prompt) + step - 1
        plan = make_plan([Chunk("r", tokens[-1:], position, blocks[: position // BLOCK_SIZE + 1])], step)
        tokens += proto.unpack_i32(runner.execute(plan).sampled_token_ids).tolist()
    assert tokens == expected


def test_step_result_fields(runner):
    plan = make_plan(
        [Chunk("a", [5, 6, 7], 0, [0]), Chunk("b", [8, 9], 0, [1], sample=False), Chunk("c", [4], 0, [2])],
        step_id=41,
        new_requests=[new_request(name, [5], temperature=0.0) for name in "abc"],
    )
    result = runner.execute(plan)
    assert result.step_id == 41 and result.error == ""
    assert len(proto.unpack_i32(result.sampled_token_ids)) == 2  # a and c sample, b is mid-prefill
    assert result.logprobs == []  # nobody asked
    assert 0 < result.forward_time <= result.step_time
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(result), type=proto.StepResult) == result


def test_step_without_sampled_rows(runner):
    plan = make_plan(
        [Chunk("a", [5, 6, 7, 8, 9], 0, [0, 1], sample=False)], new_requests=[new_request("a", [5] * 9)]
    )
    result = runner.execute(plan)
    assert proto.unpack_i32(result.sampled_token_ids).size == 0 and result.logprobs == []


def test_sampling_state_lifecycle(runner):
    runner.execute(make_plan([Chunk("a", [5, 6], 0, [0])], 0, [new_request("a", [5, 6], temperature=0.0)]))
    assert set(runner.states) == {"a"}
    runner.execute(
        make_plan([Chunk("b", [7], 0, [1])], 1, [new_request("b", [7])], finished_request_ids=["a", "zz"])
    )
    assert set(runner.states) == {"b"}
    with pytest.raises(ValueError, match="never sent as new"):
        runner.execute(make_plan([Chunk("a", [5, 6], 0, [0])], 2))


def test_logprobs_only_for_requests_that_ask(runner):
    plan = make_plan(
        [Chunk("a", [5, 6], 0, [0]), Chunk("b", [7, 8], 0, [1])],
        new_requests=[
            new_request("a", [5, 6], temperature=0.0, logprobs=2),
            new_request("b", [7, 8], temperature=0.0),
        ],
    )
    result = runner.execute(plan)
    assert len(result.logprobs) == 2
    assert result.logprobs[0] is not None and result.logprobs[1] is None
    assert len(proto.unpack_i32(result.logprobs[0].top_ids)) == 2


def test_rejects_blocks_outside_the_device_pool(runner):
    plan = make_plan([Chunk("a", [5], 0, [runner.num_device_blocks])], new_requests=[new_request("a", [5])])
    with pytest.raises(ValueError, match="device blocks"):
        runner.execute(plan)


def test_kv_pool_sized_from_gib(llama_path):
    runner = make_runner(llama_path, device_kv_blocks=None, device_kv_gib=0.001)
    per_block = kv_bytes_per_block(2, BLOCK_SIZE, 2, 16, torch.float32)
    assert runner.num_device_blocks == int(0.001 * GIB // per_block)
    assert runner.kv_pool.pages.shape[0] == 2 * runner.num_device_blocks
    assert runner.block_size == BLOCK_SIZE and runner.model_config.num_layers == 2


def test_kv_pool_default_on_cpu(llama_path, monkeypatch):
    monkeypatch.setattr(plan_module, "DEFAULT_CPU_KV_GIB", 0.002)
    runner = make_runner(llama_path, device_kv_blocks=None)
    assert runner.num_device_blocks == int(
        0.002 * GIB // kv_bytes_per_block(2, BLOCK_SIZE, 2, 16, torch.float32)
    )


def test_kv_budget_too_small_for_one_block(llama_path):
    with pytest.raises(ConfigError, match="holds no KV block"):
        make_runner(llama_path, device_kv_blocks=None, device_kv_gib=1e-9)


def test_kv_layout_matches_the_pool(runner):
    layout = runner.kv_layout
    assert (layout.num_layers, layout.block_size, layout.dtype) == (2, BLOCK_SIZE, torch.float32)
    assert runner.kv_pool.pages.shape[1:] == layout.page_shape
    assert layout.block_bytes == kv_bytes_per_block(2, BLOCK_SIZE, 2, 16, torch.float32)
    assert runner.staging is None and runner.kv_pool.pages.shape[0] == 2 * runner.num_device_blocks


def test_attach_rejects_segments_of_another_size(llama_path):
    from workers.memory.host_pool import HostSegment, local_segment_fds

    runner = ModelRunner(
        EngineConfig(
            model=str(llama_path), dtype="float32", device="cpu", block_size=BLOCK_SIZE, device_kv_blocks=8
        ),
        num_staging_blocks=4,
        blocks_per_segment=4,
    )
    segment = HostSegment.create(1, 8, 8, runner.kv_layout)  # segment 1 of 8 blocks each
    try:
        with pytest.raises(ValueError, match="disagree on blocks_per_segment"):
            runner.attach_host_segments([segment.info], local_segment_fds([segment]))
        assert runner.host_kv.pool.segments == {}
    finally:
        runner.close()
        segment.close()


def test_staging_ring_comes_out_of_a_kv_budget(llama_path):
    per_block = kv_bytes_per_block(2, BLOCK_SIZE, 2, 16, torch.float32)
    budget = 0.001
    runner = ModelRunner(
        EngineConfig(
            model=str(llama_path), dtype="float32", device="cpu", block_size=BLOCK_SIZE, device_kv_gib=budget
        ),
        num_staging_blocks=10,
    )
    staging_bytes = 2 * 10 * per_block // 2  # R = 2 areas of 10 pages; a page is half a 2-layer block
    assert runner.num_device_blocks == int((budget * GIB - staging_bytes) // per_block)
    assert runner.kv_pool.nbytes <= budget * GIB
