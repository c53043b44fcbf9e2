"""The CUDA-graph decode runner (``workers/executor/graphs.py``) on CPU: its padded path (what a
graph captures, run eagerly) gives the eager path's greedy tokens at every batch size, device-only
and streaming host blocks at a tiny device budget; its page tables, derived on the device from
layer 0's, are the eager metadata's; and the runner picks graphs where they apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_driver import assert_all_free, drive, running_engine
from step_plans import Chunk, make_plan, new_request
from tiny_models import build_model_dir

from proto.config import ConfigError, EngineConfig
from workers.executor.attention import AttentionMetadata, StepLayout
from workers.executor.graphs import DecodeGraphs, capture_sizes, padded_size
from workers.executor.kv_pool import StagingRing
from workers.executor.model import CausalLM
from workers.executor.runner import ModelRunner, graph_mode
from workers.model_config import ModelConfig

# Requests finish one after another (different max tokens), so decode batches of 6, 5, ..., 1 run,
# padded to the captured sizes 6, 4, 2, 1 (max_num_seqs 6).
PROMPTS = {
    "a": [1, 17, 99, 3, 250],
    "b": [1] + list(range(40, 77)),
    "c": [1] + [(i * 37) % 500 + 5 for i in range(30)],
    "d": [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309],
    "e": [1] + [(i * 11) % 400 + 20 for i in range(23)],
    "f": [1, 5, 6],
}
MAX_TOKENS = {"a": 12, "b": 4, "c": 8, "d": 10, "e": 2, "f": 6}
WORKLOAD = [
    dict(id=name, prompt=prompt, max_tokens=MAX_TOKENS[name], arrival=0, abort_at=None)
    for name, prompt in PROMPTS.items()
]


def test_capture_sizes():
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]
    sizes = capture_sizes(40)
    assert [padded_size(n, sizes) for n in (1, 3, 5, 9, 17, 33, 40, 41)] == [1, 4, 8, 16, 32, 40, 40, None]
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_graph_mode_selection():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    config = EngineConfig()
    assert graph_mode(config, cuda, "triton") == "capture"
    assert graph_mode(config, cuda, "torch") is None  # padded torch attention would gather the model length
    assert graph_mode(config, cpu, "torch") is None
    assert graph_mode(EngineConfig(enforce_eager=True), cuda, "triton") is None
    padding = EngineConfig(extra={"decode_padding": True})
    assert graph_mode(padding, cpu, "torch") == "pad"
    assert graph_mode(EngineConfig(enforce_eager=True, extra={"decode_padding": True}), cpu, "torch") is None


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("llama-graphs"), "llama")


@pytest.mark.parametrize("staged", [False, True])
def test_derived_page_tables_are_the_eager_ones(llama_dir, staged):
    """For every layer, the real rows' page tables and slot pages equal ``AttentionMetadata.from_layout``'s;
    padded rows and columns read and write the scratch page only."""
    config = ModelConfig.from_folder(llama_dir)
    num_layers, num_device_blocks, block_size = config.num_layers, 10, 4
    staging = StagingRing(num_layers * num_device_blocks, 2, 5) if staged else None
    num_pages = num_layers * num_device_blocks + (staging.num_pages if staging else 0) + 1
    pages = torch.zeros(num_pages, 2, block_size, config.num_kv_heads, config.head_dim)
    with torch.device("cpu"):
        model = CausalLM(config, torch.float32)
    graphs = DecodeGraphs(model, pages, block_size, num_device_blocks, staging, 8, max_blocks=6)
    host = num_device_blocks  # first host block id
    tables = [[3, host + 7, 1], [host + 2, 0], [5, 6, 8, host + 9, host + 7]]
    if not staged:
        tables = [[b % num_device_blocks for b in table] for table in tables]
    context_lens = np.array([10, 7, 19])
    args = (
        np.ones(3),
        context_lens - 1,
        [len(t) for t in tables],
        np.concatenate(tables),
        block_size,
        num_device_blocks,
    )
    layout = StepLayout.build(*args, staging)
    eager, _ = AttentionMetadata.from_layout(layout, torch.device("cpu"))
    batch = graphs.prepare(layout, np.array([11, 12, 13]))
    assert batch == 4
    meta = graphs.metadata(batch, None)
    assert torch.equal(meta.context_lens[:3], eager.context_lens) and meta.context_lens[3] == 1
    assert torch.equal(meta.positions[:3], eager.positions)
    for layer in range(num_layers):
        page_table, eager_table = meta.page_table(layer), eager.page_table(layer)
        width = eager_table.shape[1]
        for row, table in enumerate(tables):
            assert torch.equal(page_table[row, : len(table)], eager_table[row, : len(table)])
            assert (page_table[row, width:] == graphs.scratch_page).all()
        assert (page_table[3] == graphs.scratch_page).all()
        slot_pages = meta.slot_pages(layer)
        assert torch.equal(slot_pages[:3], eager.slot_pages(layer)) and slot_pages[3] == graphs.scratch_page


@pytest.fixture(scope="module")
def reference(llama_dir):
    """Eager greedy tokens with a device large enough for the whole batch."""
    import asyncio

    async def run():
        async with running_engine(llama_dir, device_kv_blocks=256) as engine:
            return await drive(engine, WORKLOAD)

    return asyncio.run(run())


# Device-only with roomy and tight budgets (preemption changes batch sizes), and pie at a device
# budget so small that most KV is on host and streamed.
POLICIES = {
    "device": dict(device_kv_blocks=256),
    "tight": dict(device_kv_blocks=24),
    "pie": dict(device_kv_blocks=24, kv_policy="pie", expansion="fixed:96"),
    # The host-page kernel moves the pages (Triton's interpreter, CPU tensors for mapped memory).
    "pie-kernel": dict(device_kv_blocks=24, kv_policy="pie", expansion="fixed:96", host_page_kernel=True),
}


@pytest.mark.parametrize("policy", list(POLICIES))
async def test_padded_decode_gives_eager_tokens(llama_dir, reference, policy):
    overrides = dict(POLICIES[policy])
    extra = {"decode_padding": True, "host_page_kernel": overrides.pop("host_page_kernel", False)}
    overrides |= dict(extra=extra, max_num_seqs=6)
    async with running_engine(llama_dir, **overrides) as engine:
        runner = engine.actor("executor").runner
        assert runner.graphs is not None
        layouts: list = []  # each step's layout once (accepts is asked again inside prepare)
        accepts = runner.graphs.accepts

        def counting(layout) -> bool:
            if not any(seen is layout for seen in layouts):
                layouts.append(layout)
            return accepts(layout)

        runner.graphs.accepts = counting
        tokens = await drive(engine, WORKLOAD)
        decode_steps = sum(layout.is_decode for layout in layouts)
        num_runs = dict(runner.graphs.num_runs)
        assert_all_free(engine)
        if policy.startswith("pie"):
            assert engine.stats().bytes_to_device_total > 0
            assert (runner.host_kv.page_lists is not None) == (policy == "pie-kernel")
    assert tokens == reference
    # Decode steps ran padded, at several captured sizes (padding included: 5 and 3 sequences pad
    # to 6 and 4). With room for all, every decode step ran padded (how many steps are pure decode
    # depends on when the requests arrive: one that arrives late shares a step with decodes).
    assert set(num_runs) <= {1, 2, 4, 6} and len(num_runs) >= 2, num_runs
    if policy == "device":
        assert sum(num_runs.values()) == decode_steps > 0, (num_runs, decode_steps)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: records capture and replay, captures nothing."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.index = sum(1 for entry in log if entry[0] == "begin")

    def capture_begin(self, pool=None) -> None:
        self.log.append(("begin", self.index))

    def capture_end(self) -> None:
        self.log.append(("end", self.index))

    def replay(self) -> None:
        self.log.append(("replay", self.index))


class RecordingHooks:
    def __init__(self, log: list) -> None:
        self.log = log

    def before_attention(self, layer: int) -> None:
        self.log.append(("before", layer))

    def after_attention(self, layer: int) -> None:
        self.log.append(("after", layer))


def test_piecewise_capture_cuts_at_every_hook_and_replays_them_in_order(llama_dir):
    """The forward pass calls each layer's hooks once, in order, so capturing it with a splitter gives
    2L + 1 pieces; a replay runs them with the real hooks between, exactly where eager runs them."""
    from workers.executor.graphs import PieceSplitter

    config = ModelConfig.from_folder(llama_dir)
    num_layers, num_device_blocks = config.num_layers, 4
    staging = StagingRing(num_layers * num_device_blocks, 2, 3)
    pages = torch.zeros(
        num_layers * num_device_blocks + staging.num_pages + 1, 2, 4, config.num_kv_heads, config.head_dim
    )
    with torch.device("cpu"):
        model = CausalLM(config, torch.float32)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    graphs = DecodeGraphs(model, pages, 4, num_device_blocks, staging, 2, max_blocks=2)
    capture_log: list = []
    splitter = PieceSplitter(None, lambda: FakeGraph(capture_log))
    splitter.begin()
    graphs.piece_outputs[2] = graphs._forward(2, splitter)
    splitter.end()
    assert len(splitter.pieces) == 2 * num_layers + 1
    assert capture_log == [(kind, i) for i in range(2 * num_layers + 1) for kind in ("begin", "end")]

    replay_log: list = []
    graphs.pieces[2] = splitter.pieces
    graphs.graphs[2] = FakeGraph(replay_log)  # marks the runner captured
    for piece in splitter.pieces:
        piece.log = replay_log
    assert graphs.run(2, RecordingHooks(replay_log)) is graphs.piece_outputs[2]
    expected = []
    for layer in range(num_layers):
        expected += [("replay", 2 * layer), ("before", layer), ("replay", 2 * layer + 1), ("after", layer)]
    assert replay_log == expected + [("replay", 2 * num_layers)]


def test_enforce_eager_is_a_flag():
    import argparse

    from pied.args import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(["--enforce-eager"]).enforce_eager is True
    assert parser.parse_args([]).enforce_eager is None  # the config's default: graphs where they apply
    with pytest.raises(ConfigError, match="--enforce-eager"):
        EngineConfig(enforce_eager="yes").validate()


def test_triton_decode_padded_gives_eager_logits(llama_dir):
    """The attention a graph captures on CUDA (the Triton decode kernel, here interpreted) over the
    padded rows gives the eager torch backend's logits for the real rows."""
    settings = dict(
        model=str(llama_dir),
        dtype="float32",
        device="cpu",
        block_size=4,
        device_kv_blocks=32,
        max_model_len=64,
    )
    eager = ModelRunner(EngineConfig(**settings))
    padded = ModelRunner(
        EngineConfig(**settings, attention_backend="triton", max_num_seqs=4, extra={"decode_padding": True})
    )
    assert padded.graphs is not None and eager.graphs is None
    prompts = {"a": [1, 17, 99, 3, 250], "b": [1, 40, 41, 42, 43, 44, 45, 46, 47], "c": [1, 5, 6]}
    blocks = {"a": [9, 3], "b": [30, 12, 7], "c": [21]}
    prefill = make_plan(
        [Chunk(name, prompt, 0, blocks[name]) for name, prompt in prompts.items()],
        0,
        [new_request(name, prompt, temperature=0.0) for name, prompt in prompts.items()],
    )
    for runner in (eager, padded):
        runner.execute(prefill)
    decode = make_plan([Chunk(name, [7], len(prompt), blocks[name]) for name, prompt in prompts.items()], 1)
    expected = eager.compute_logits(decode)
    actual = padded.compute_logits(decode)
    assert padded.graphs.num_runs == {4: 1}  # 3 sequences padded to 4
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
