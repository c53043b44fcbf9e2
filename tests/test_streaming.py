"""Host blocks streamed through the staging ring (workers/executor/streaming.py, host_kv.py,
copy_engine.py), swaps, stalls.

The reference for every streaming step is the same plan with all blocks on device, run by a second
runner on the same weights: logits must agree exactly, and after each step the host copy of every
host block must hold what the device-only runner holds in that block's pages (write-back).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
import pytest
import torch
from step_plans import BlockAllocator, Chunk, make_plan, new_request

import proto
from proto.config import ConfigError, EngineConfig
from workers.executor.copy_engine import ThreadCopyEngine
from workers.executor.copy_throttle import COPY_THROTTLE_ENV
from workers.executor.runner import ModelRunner
from workers.executor.streaming import StreamStats
from workers.memory.host_pool import HostSegment, local_segment_fds

BLOCK_SIZE = 4
NUM_DEVICE_BLOCKS = 48
NUM_LAYERS = 5  # more layers than ring areas, so areas are reused within a step
BLOCKS_PER_SEGMENT = 4
NUM_HOST_BLOCKS = 30  # 8 segments, the last one partial
NUM_STAGING_BLOCKS = 24
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)


def skip_without(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("llama", num_hidden_layers=NUM_LAYERS)


def make_runner(path, device: str = "cpu", **kwargs) -> ModelRunner:
    extra = kwargs.pop("extra", {})
    config = EngineConfig(
        model=str(path),
        dtype="float32",
        device=device,
        block_size=BLOCK_SIZE,
        device_kv_blocks=NUM_DEVICE_BLOCKS,
        prefetch_depth=kwargs.pop("prefetch_depth", 1),
        kv_policy=kwargs.pop("kv_policy", "none"),
        extra=extra,
    )
    return ModelRunner(config, **kwargs)


def create_segments(runner: ModelRunner, num_blocks: int = NUM_HOST_BLOCKS) -> list[HostSegment]:
    """Host segments made here (as the memory manager would) and attached to ``runner``."""
    segments = []
    for segment_id, first in enumerate(range(0, num_blocks, BLOCKS_PER_SEGMENT)):
        count = min(BLOCKS_PER_SEGMENT, num_blocks - first)
        segments.append(HostSegment.create(segment_id, first, count, runner.kv_layout))
    runner.attach_host_segments([segment.info for segment in segments], local_segment_fds(segments))
    return segments


@pytest.fixture
def host_runner(model_path, request):
    """``host_runner(**kwargs)`` -> (runner with host segments attached, the segments)."""
    made: list[tuple[ModelRunner, list[HostSegment]]] = []

    def make(device: str = "cpu", num_host_blocks: int = NUM_HOST_BLOCKS, **kwargs):
        kwargs.setdefault("num_staging_blocks", NUM_STAGING_BLOCKS)
        runner = make_runner(model_path, device, blocks_per_segment=BLOCKS_PER_SEGMENT, **kwargs)
        made.append((runner, create_segments(runner, num_host_blocks)))
        return made[-1]

    yield make
    for runner, segments in made:
        runner.close()
        for segment in segments:
            segment.close()


def host_page(segments: list[HostSegment], host_index: int, layer: int) -> torch.Tensor:
    return segments[host_index // BLOCKS_PER_SEGMENT].tensor[layer, host_index % BLOCKS_PER_SEGMENT]


def remap(plan: proto.StepPlan, mapping: np.ndarray) -> proto.StepPlan:
    """The same plan with each block id ``b`` replaced by ``mapping[b]``."""
    block_ids = mapping[proto.unpack_i32(plan.block_tables)]
    return msgspec.structs.replace(plan, block_tables=proto.pack_i32(block_ids))


def run_step(runner: ModelRunner, plan: proto.StepPlan) -> tuple[torch.Tensor, StreamStats]:
    """Logits of every scheduled token, and the step's streaming stats."""
    inputs = runner.prepare(plan)
    inputs.logits_indices = torch.arange(inputs.meta.num_tokens, device=runner.device)
    logits = runner.forward(inputs)
    stream = inputs.meta.stream
    return logits.cpu(), stream.stats() if stream is not None else StreamStats()  # type: ignore[attr-defined]


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]
    block_ids: list[int]

    def chunk(self, start: int, end: int) -> Chunk:
        return Chunk(
            self.request_id, self.token_ids[start:end], start, self.block_ids[: -(-end // BLOCK_SIZE)]
        )


def scenario(seed: int) -> tuple[list[list[Chunk]], list[int]]:
    """Steps of three requests: prefill, chunked prefill, a prefill joining mid-way, then decodes
    (several decode-only steps in a row, so the next-step prefetch is used). Returns the steps and
    the device block ids they use (of the device-only runner)."""
    rng = np.random.default_rng(seed)
    allocator = BlockAllocator(NUM_DEVICE_BLOCKS, BLOCK_SIZE, seed)
    lengths = {"a": 10 + 10, "b": 14 + 9, "c": 7 + 7}
    seqs = {
        name: Sequence(name, rng.integers(5, 500, size=length).tolist(), allocator.allocate(length))
        for name, length in lengths.items()
    }
    a, b, c = seqs["a"], seqs["b"], seqs["c"]
    steps = [
        [a.chunk(0, 10), b.chunk(0, 6)],  # prefill + first chunk
        [b.chunk(6, 14), a.chunk(10, 11)],  # second chunk + decode
        [a.chunk(11, 12), b.chunk(14, 15), c.chunk(0, 7)],  # decodes + a new prefill
    ]
    for step in range(7):  # decode-only steps
        steps.append(
            [a.chunk(12 + step, 13 + step), b.chunk(15 + step, 16 + step), c.chunk(7 + step, 8 + step)]
        )
    used = sorted(block for seq in seqs.values() for block in seq.block_ids)
    return steps, used


def host_mapping(
    used: list[int], fraction: float, placement: str, seed: int
) -> tuple[np.ndarray, dict[int, int]]:
    """Device-only block id -> block id with ``fraction`` of ``used`` moved to host blocks.
    ``placement``: "random" host indices, or "runs" (consecutive, in block id order)."""
    rng = np.random.default_rng(seed)
    mapping = np.arange(NUM_DEVICE_BLOCKS)
    moved = sorted(rng.choice(used, size=round(fraction * len(used)), replace=False).tolist())
    if placement == "random":
        host_indices = rng.choice(NUM_HOST_BLOCKS, size=len(moved), replace=False).tolist()
    else:
        host_indices = list(range(3, 3 + len(moved)))  # starts mid-segment: runs cross segments
    to_host = dict(zip(moved, host_indices))
    for block, host_index in to_host.items():
        mapping[block] = NUM_DEVICE_BLOCKS + host_index
    return mapping, to_host


def assert_host_copies_match(reference: ModelRunner, segments, to_host: dict[int, int]) -> None:
    pages = reference.kv_pool.pages.cpu()
    for block, host_index in to_host.items():
        for layer in range(NUM_LAYERS):
            expected = pages[layer * NUM_DEVICE_BLOCKS + block]
            assert torch.equal(host_page(segments, host_index, layer), expected), (block, host_index, layer)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("prefetch_depth", [1, 2])
@pytest.mark.parametrize(
    "fraction, placement, prefetch_next_step",
    [(0.5, "random", True), (0.9, "runs", True), (1.0, "random", True), (0.9, "random", False)],
)
def test_host_blocks_give_device_logits(
    model_path, host_runner, device, prefetch_depth, fraction, placement, prefetch_next_step
):
    skip_without(device)
    reference = make_runner(model_path, device)
    runner, segments = host_runner(
        device, prefetch_depth=prefetch_depth, prefetch_next_step=prefetch_next_step
    )
    steps, used = scenario(seed=prefetch_depth)
    mapping, to_host = host_mapping(used, fraction, placement, seed=int(fraction * 10))
    prefetched = 0
    for step_id, chunks in enumerate(steps):
        plan = make_plan(chunks, step_id)
        expected, _ = run_step(reference, plan)
        logits, stats = run_step(runner, remap(plan, mapping))
        if device == "cpu":
            assert torch.equal(logits, expected), step_id
        else:
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert_host_copies_match(reference, segments, to_host)
        # Device blocks hold the same pages in both runners.
        device_blocks = [b for b in used if b not in to_host]
        for layer in range(NUM_LAYERS):
            pages = [layer * NUM_DEVICE_BLOCKS + b for b in device_blocks]
            assert torch.equal(runner.kv_pool.pages[pages], reference.kv_pool.pages[pages])
        block_ids = proto.unpack_i32(remap(plan, mapping).block_tables)
        assert stats.num_host_blocks == len(set(block_ids[block_ids >= NUM_DEVICE_BLOCKS].tolist()))
        prefetched += stats.num_prefetched_layers
    assert (prefetched > 0) == prefetch_next_step


def test_step_result_reports_streaming(host_runner):
    runner, _ = host_runner(kv_policy="pie")
    assert runner.link_bandwidth > 0 and runner.host_kv._engine is None  # measured at start, then stopped
    layout = runner.kv_layout
    host = [NUM_DEVICE_BLOCKS + i for i in (0, 1, 2, 9)]
    prompt = list(range(5, 5 + 4 * BLOCK_SIZE))
    # Prefill writes all four host blocks: loads and write-backs of 4 pages per layer.
    plan = make_plan([Chunk("a", prompt, 0, host)], 0, [new_request("a", prompt, temperature=0.0)])
    result = runner.execute(plan)
    assert result.num_host_blocks == 4
    assert result.bytes_to_device == NUM_LAYERS * 4 * layout.page_bytes
    assert result.bytes_to_host == NUM_LAYERS * 4 * layout.page_bytes
    assert 0 <= result.stall_time <= result.forward_time
    assert 0 < result.layer_compute_time <= result.forward_time / NUM_LAYERS
    assert result.copy_time > 0 and result.link_bandwidth == runner.link_bandwidth
    # Decode into a device tail: the host blocks are only read.
    token = proto.unpack_i32(result.sampled_token_ids).tolist()
    result = runner.execute(make_plan([Chunk("a", token, len(prompt), host + [7])], 1))
    assert result.bytes_to_host == 0 and result.bytes_to_device == NUM_LAYERS * 4 * layout.page_bytes


def test_device_only_steps_have_no_copy_activity(host_runner):
    runner, _ = host_runner()
    plan = make_plan([Chunk("a", [5, 6, 7], 0, [3])], 0, [new_request("a", [5, 6, 7])])
    result = runner.execute(plan)
    assert (result.num_host_blocks, result.bytes_to_device, result.bytes_to_host, result.stall_time) == (
        0,
        0,
        0,
        0,
    )
    assert result.layer_compute_time > 0
    assert runner.host_kv._engine is None  # the copy engine never started


def test_more_host_blocks_than_staging_slots(host_runner, model_path):
    runner, _ = host_runner(num_staging_blocks=4)
    blocks = [NUM_DEVICE_BLOCKS + i for i in range(5)]
    plan = make_plan([Chunk("a", [5] * 17, 0, blocks)], 0, [new_request("a", [5])])
    with pytest.raises(ValueError, match="5 distinct host blocks but a staging area holds 4"):
        runner.execute(plan)
    # A host block repeated across sequences counts once.
    shared = [Chunk("b", [5] * 16, 0, blocks[:4]), Chunk("c", [6] * 16, 0, blocks[:4])]
    runner.execute(make_plan(shared, 1, [new_request(name, [5]) for name in "bc"]))
    # Without staging there are no host blocks at all.
    device_only = make_runner(model_path)
    with pytest.raises(ValueError, match="device blocks"):
        device_only.execute(make_plan([Chunk("a", [5], 0, blocks[:1])], 0, [new_request("a", [5])]))


def test_host_block_outside_every_segment(host_runner):
    runner, _ = host_runner()
    plan = make_plan([Chunk("a", [5], 0, [NUM_DEVICE_BLOCKS + NUM_HOST_BLOCKS])], 0, [new_request("a", [5])])
    with pytest.raises(ValueError, match="in no mapped host segment"):
        runner.execute(plan)


def test_prefetch_is_not_used_after_a_block_changes_hands(host_runner, model_path):
    """A decode-only step prefetches the next step's first layers; when the next step's host block
    belongs to another request (its pages rewritten in between), the prefetch must be dropped."""
    reference = make_runner(model_path)
    runner, segments = host_runner()
    rng = np.random.default_rng(3)
    prompt_a, prompt_b = rng.integers(5, 500, 8).tolist(), rng.integers(5, 500, 8).tolist()
    # a: blocks 1, 2 (host 5, device 2); b: blocks 3, 4 on device.
    mapping = np.arange(NUM_DEVICE_BLOCKS)
    mapping[1] = NUM_DEVICE_BLOCKS + 5
    plans = [
        make_plan([Chunk("a", prompt_a, 0, [1, 2]), Chunk("b", prompt_b, 0, [3, 4])], 0),
        make_plan([Chunk("a", [9], 8, [1, 2, 5])], 1),
        make_plan([Chunk("a", [11], 9, [1, 2, 5])], 2),
    ]
    for plan in plans:
        run_step(reference, plan)
        run_step(runner, remap(plan, mapping))
    # a finishes; b's first block moves into host block 5 (as a migration between steps would).
    for layer in range(NUM_LAYERS):
        host_page(segments, 5, layer).copy_(reference.kv_pool.pages[layer * NUM_DEVICE_BLOCKS + 3])
    mapping[3] = NUM_DEVICE_BLOCKS + 5
    plan = make_plan([Chunk("b", [13], 8, [3, 4, 6])], 3)
    expected, _ = run_step(reference, plan)
    logits, stats = run_step(runner, remap(plan, mapping))
    assert stats.num_prefetched_layers == 0
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_prefetch_is_reused_for_the_blocks_that_stay_when_others_join_or_leave(
    model_path, host_runner, device
):
    """Blocks migrate to host (swap_out into a block the next step reads) and a request stops
    between steps, so each step reads a different host block set: the prefetched pages of the
    blocks that stayed (shifted to new slots) are used, the rest loaded, logits stay exact."""
    skip_without(device)
    reference = make_runner(model_path, device)
    runner, segments = host_runner(device)
    steps, used = scenario(seed=7)
    mapping, to_host = host_mapping(used, 0.5, "random", seed=7)
    free_host = [index for index in range(NUM_HOST_BLOCKS) if index not in to_host.values()]
    reused_after_change = 0
    previous_ids: set[int] = set()
    for step_id, chunks in enumerate(steps):
        if step_id >= 6:
            chunks = [chunk for chunk in chunks if chunk.request_id != "c"]  # c stopped
        plan = make_plan(chunks, step_id)
        swap_out = []
        if step_id >= 4:
            # The lowest device block of the step moves to a free host block (ids below the
            # step's other host blocks: every later slot shifts).
            blocks = sorted({b for b in proto.unpack_i32(plan.block_tables).tolist() if b not in to_host})
            if blocks:
                block, host_index = blocks[0], free_host.pop(0)
                swap_out.append((block, NUM_DEVICE_BLOCKS + host_index))
                to_host[block] = host_index
                mapping[block] = NUM_DEVICE_BLOCKS + host_index
        expected, _ = run_step(reference, plan)
        streamed = msgspec.structs.replace(remap(plan, mapping), swap_out=proto.pack_i32(np.ravel(swap_out)))
        runner.swap(streamed)
        logits, stats = run_step(runner, streamed)
        if device == "cpu":
            assert torch.equal(logits, expected), step_id
        else:
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert_host_copies_match(reference, segments, to_host)
        block_ids = proto.unpack_i32(streamed.block_tables)
        ids = set(block_ids[block_ids >= NUM_DEVICE_BLOCKS].tolist())
        if previous_ids and ids != previous_ids:
            assert stats.num_prefetched_pages <= stats.num_prefetched_layers * len(ids & previous_ids)
            reused_after_change += stats.num_prefetched_pages
        previous_ids = ids
    assert reused_after_change > 0


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_swap_out_then_in_round_trips_blocks(host_runner, device):
    skip_without(device)
    runner, segments = host_runner(device)
    layout, num_pages = runner.kv_layout, NUM_LAYERS * NUM_DEVICE_BLOCKS
    torch.manual_seed(0)
    runner.kv_pool.pages[:num_pages] = torch.randn_like(runner.kv_pool.pages[:num_pages])
    original = runner.kv_pool.pages.cpu()
    D = NUM_DEVICE_BLOCKS

    def pages_of(pages: torch.Tensor, block: int) -> torch.Tensor:
        return pages[[layer * D + block for layer in range(NUM_LAYERS)]]

    def step(step_id: int, swap_out=(), swap_in=()) -> proto.StepResult:
        plan = make_plan([Chunk("r", [5], 0, [40])], step_id, [new_request("r", [5])] if step_id == 0 else [])
        plan = msgspec.structs.replace(
            plan, swap_out=proto.pack_i32(np.ravel(swap_out)), swap_in=proto.pack_i32(np.ravel(swap_in))
        )
        return runner.execute(plan)

    # 3, 4 -> consecutive host blocks across a segment boundary (one run per segment); 9 alone.
    result = step(0, swap_out=[(3, D + 3), (4, D + 4), (9, D + 0)])
    assert result.bytes_to_host == 3 * layout.block_bytes and result.bytes_to_device == 0
    for block, host_index in ((3, 3), (4, 4), (9, 0)):
        for layer in range(NUM_LAYERS):
            assert torch.equal(host_page(segments, host_index, layer), original[layer * D + block])
    # swap_out runs first: block 3 may be swapped out and refilled by the same plan.
    result = step(1, swap_out=[(3, D + 7)], swap_in=[(D + 3, 10), (D + 4, 11), (D + 0, 12), (D + 7, 3)])
    assert result.bytes_to_host == layout.block_bytes and result.bytes_to_device == 4 * layout.block_bytes
    pages = runner.kv_pool.pages.cpu()
    for destination, source in ((10, 3), (11, 4), (12, 9), (3, 3)):
        assert torch.equal(pages_of(pages, destination), pages_of(original, source))
    with pytest.raises(ValueError, match="host block ids must be at least"):
        step(2, swap_out=[(3, 5)])
    with pytest.raises(ValueError, match="device block ids must be in"):
        step(2, swap_in=[(D + 1, D + 2)])


@pytest.fixture
def one_compute_thread():
    """Keeps compute cheap and steady even on a busy machine, so the throttled copies dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def throttled_decode(host_runner, num_host_blocks: int, throttle: float) -> proto.StepResult:
    """One decode step reading ``num_host_blocks`` host blocks (filled as if by earlier steps)."""
    runner, segments = host_runner(extra={"copy_throttle_bytes_per_s": throttle})
    for segment in segments:
        segment.tensor.normal_()
    tokens = [5] * (BLOCK_SIZE * num_host_blocks)
    device_blocks = list(range(num_host_blocks))
    runner.execute(make_plan([Chunk("a", tokens, 0, device_blocks)], 0, [new_request("a", tokens)]))
    runner.execute(make_plan([Chunk("a", [6], len(tokens), device_blocks + [40])], 1))  # warm-up
    host = [NUM_DEVICE_BLOCKS + i for i in range(num_host_blocks)]
    return runner.execute(make_plan([Chunk("a", [6], len(tokens), host + [40])], 2))


def test_throttled_copies_stall_more_with_more_bytes(host_runner, one_compute_thread):
    page_bytes = 2 * BLOCK_SIZE * 2 * 16 * 4
    throttle = 20 * NUM_LAYERS * page_bytes  # 2 host blocks take 100 ms per step, 8 take 400 ms
    small, large = throttled_decode(host_runner, 2, throttle), throttled_decode(host_runner, 8, throttle)
    assert small.bytes_to_device == NUM_LAYERS * 2 * page_bytes and small.bytes_to_host == 0
    assert large.bytes_to_device == 4 * small.bytes_to_device
    # Nearly all of the copying is exposed: there is almost no compute to hide it under.
    assert 0.05 < small.stall_time and 2 * small.stall_time < large.stall_time
    assert large.stall_time > 0.25 and large.stall_time <= large.forward_time
    assert large.layer_compute_time < large.stall_time / NUM_LAYERS


def test_copy_throttle_from_environment(model_path, monkeypatch):
    monkeypatch.setenv(COPY_THROTTLE_ENV, "1e6")
    assert make_runner(model_path).host_kv.throttle_bytes_per_s == 1e6
    monkeypatch.setenv(COPY_THROTTLE_ENV, "fast")
    with pytest.raises(ConfigError, match="copy throttle"):
        make_runner(model_path)
    monkeypatch.delenv(COPY_THROTTLE_ENV)
    assert make_runner(model_path).host_kv.throttle_bytes_per_s is None


def test_copy_throttle_file_changes_the_link_between_steps(host_runner, one_compute_thread, tmp_path):
    """The benchmarks' second tenant: the throttle file is re-read between steps, so the same
    decode stalls far more once it holds a slower link, and not at all once it is emptied."""
    control = tmp_path / "throttle"
    runner, segments = host_runner(extra={"copy_throttle_file": str(control)})
    for segment in segments:
        segment.tensor.normal_()
    num_host_blocks = 8
    tokens = [5] * (BLOCK_SIZE * num_host_blocks)
    device_blocks = list(range(num_host_blocks))
    runner.execute(make_plan([Chunk("a", tokens, 0, device_blocks)], 0, [new_request("a", tokens)]))
    host = [NUM_DEVICE_BLOCKS + i for i in range(num_host_blocks)]

    def decode(step: int) -> proto.StepResult:
        return runner.execute(make_plan([Chunk("a", [6], len(tokens), host + [40])], step))  # the same position again

    decode(1)  # warm-up
    free = decode(2)
    page_bytes = 2 * BLOCK_SIZE * 2 * 16 * 4
    slow = 5 * NUM_LAYERS * page_bytes  # 8 host blocks take 1.6 s per step
    control.write_text(f"{slow}\n")
    decode(3)  # its first layers were prefetched by the step before, on the old link
    throttled = decode(4)
    assert runner.host_kv.throttle_bytes_per_s == slow
    assert throttled.stall_time > 0.5 > free.stall_time  # most of 1.6 s is exposed
    assert throttled.bytes_to_device / throttled.copy_time < 2 * slow  # and the link measures slow
    control.write_text("")
    decode(5)  # the same: its first layers were prefetched under the throttle
    assert decode(6).stall_time < throttled.stall_time / 4
    assert runner.host_kv.throttle_bytes_per_s is None
    control.write_text("fast")
    with pytest.raises(ConfigError, match="copy throttle"):
        decode(7)


def test_staging_ring_pages(host_runner, model_path):
    runner, _ = host_runner(num_staging_blocks=6, prefetch_depth=2)
    assert runner.staging is not None
    assert (runner.staging.first_page, runner.staging.num_areas, runner.staging.area_size) == (
        NUM_LAYERS * NUM_DEVICE_BLOCKS,
        3,
        6,
    )
    assert runner.kv_pool.pages.shape[0] == NUM_LAYERS * NUM_DEVICE_BLOCKS + 3 * 6
    deep = make_runner(model_path, num_staging_blocks=2, prefetch_depth=9)  # R is at most L
    assert deep.staging is not None and deep.staging.num_areas == NUM_LAYERS
    assert make_runner(model_path).kv_pool.pages.shape[0] == NUM_LAYERS * NUM_DEVICE_BLOCKS


def test_detach_drains_and_unmaps(host_runner):
    runner, segments = host_runner()
    host = [NUM_DEVICE_BLOCKS + i for i in (0, 1)]
    tokens = [5] * 8
    runner.execute(make_plan([Chunk("a", tokens, 0, host)], 0, [new_request("a", tokens)]))
    runner.execute(make_plan([Chunk("a", [6], 8, host + [2])], 1))  # decode-only: prefetch in flight
    runner.detach_host_segments([0])
    assert 0 not in runner.host_kv.pool.segments and runner.host_kv.prefetched is None
    with pytest.raises(ValueError, match="in no mapped host segment"):
        runner.execute(make_plan([Chunk("a", [7], 9, host + [2])], 2))


def test_thread_copy_engine_order_errors_and_lifetime():
    engine = ThreadCopyEngine()
    staging, host = torch.zeros(4), torch.arange(4.0)
    # FIFO: a later batch sees what an earlier one wrote.
    first = engine.submit([(staging, host)], 16)
    second = engine.submit([(host, staging * 0), (staging[:2], host[2:])], 16)
    engine.wait(first)
    engine.synchronize(second)
    assert staging.tolist() == [0.0, 0.0, 2.0, 3.0] and first.copy_time() > 0
    # A failed copy is raised to compute, then every later wait raises too.
    failed = engine.submit([(torch.zeros(3), torch.zeros(4))], 0)
    with pytest.raises(RuntimeError, match="copy thread failed"):
        engine.wait(failed)
    with pytest.raises(RuntimeError, match="copy thread failed"):
        engine.synchronize()
    engine.close()
    assert not engine._thread.is_alive()
    # An engine nobody closed stops its thread when collected.
    thread = ThreadCopyEngine()._thread
    thread.join(timeout=5)
    assert not thread.is_alive()
