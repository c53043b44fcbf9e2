"""The CUDA-graph decode runner (``workers/executor/graphs.py``) on CPU: its padded path (what a
graph captures, run eagerly) gives the eager path's greedy tokens at every batch size, device-only
and streaming host blocks at a tiny device budget; its page tables, derived on the device from
layer 0's, are the eager metadata's; and the runner picks graphs where they apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_driver import assert_all_free, drive, running_engine
from tiny_models import build_model_dir

from proto.config import EngineConfig
from workers.executor.attention import AttentionMetadata, StepLayout
from workers.executor.graphs import DecodeGraphs, capture_sizes, padded_size
from workers.executor.kv_pool import StagingRing
from workers.executor.model import CausalLM
from workers.executor.runner import graph_mode
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
    """For every layer, the real rows' page tables and slot pages equal ``AttentionMetadata.build``'s;
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
    eager = AttentionMetadata.build(*args, torch.device("cpu"), staging)
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
        tokens = await drive(engine, WORKLOAD)
        runner = engine.actor("executor").runner
        assert runner.graphs is not None
        num_runs = dict(runner.graphs.num_runs)
        assert_all_free(engine)
        if policy.startswith("pie"):
            assert engine.stats().bytes_to_device_total > 0
            assert (runner.host_kv.page_lists is not None) == (policy == "pie-kernel")
    assert tokens == reference
    # Decode steps ran padded, at several captured sizes (padding included: 5 and 3 sequences pad
    # to 6 and 4). With room for all, every step after the prefill is a decode step.
    assert set(num_runs) <= {1, 2, 4, 6} and len(num_runs) >= 2, num_runs
    if policy == "device":
        assert sum(num_runs.values()) == max(MAX_TOKENS.values()) - 1, num_runs
