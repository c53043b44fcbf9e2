"""Decode under CUDA graphs (DESIGN.md "Executor on accelerators"): persistent inputs, padded batches.

A decode step (one new token per sequence) runs at a *captured size*: its batch is padded to the
next of 1, 2, 4, 8, 16, 32, ... (steps of 16) up to ``--max-num-seqs``. Everything the forward
pass reads lives in one persistent row per sequence (``DecodeGraphs.rows``): token id, position,
context length, slot offset, and the sequence's pages in layer 0 (the slot's, then its block
table, ``max_blocks`` wide). Each step writes its rows into a pinned host copy of that buffer and
copies them in one transfer; the per-layer page tables are derived on the device from layer 0's
(a device block ``b`` is page ``l * D + b``, a host block's staging page moves by one area per
layer, ``AttentionMetadata.page_table``). Padded rows and padded block-table columns point at one
*scratch page* after the staging ring: padded rows write their K/V there and attend to it alone,
and their logits are dropped.

Three ways to run the same ``DecodeGraphs._forward``:

- captured (CUDA, not ``--enforce-eager``, triton attention): one graph per size, captured
  largest first into one memory pool, replayed after the rows are copied;
- padded (not captured): the same function called eagerly. This is what the CPU tests run
  (``EngineConfig.extra["decode_padding"]``), so the code a graph captures is the code they check;
- eager (``ModelRunner`` without graphs): the plain path, for every other step.

Streaming (a step with host blocks) is **piecewise**: the forward pass is captured in ``2L + 1``
pieces cut at every layer's ``before_attention``/``after_attention`` hook, and replayed piece by
piece with the step's ``LayerStreamer`` hooks run eagerly between them. The hooks then do exactly
what they do without graphs: wait for the layer's load (an event wait on the compute stream, whose
stall is timed), and submit the write-back and the refill on the copy stream; the prefetch of the
next step's first layers works unchanged. Attention itself is inside the pieces (it reads the
staging pages through the derived page tables), so only those waits and submissions are eager.
Capturing the loads inside the graph instead (event edges to a load stream, the host-page kernel
reading a static address list) would hide the per-layer stall from the host, which the expansion
controller needs, and cannot prefetch across steps.

The rows are copied whole (``max_blocks`` columns each, for the model length): one transfer of
``batch * (5 + max_blocks)`` int64s per step, as vLLM copies its block table rows.

Not yet run on a GPU (none has been lent): capture and replay are checked on CPU through the
padded path and, for the piecewise order, stand-in graphs (tests/test_graphs.py); the first GPU
run is ``perf/gpu_check.sh`` (``perf/decode_roofline.py`` captures and replays them).

The torch attention backend is never captured: padded to ``max_blocks`` it would gather every
sequence's KV up to the model length, so on CUDA it runs eagerly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from workers.executor.attention import AttentionGroup, AttentionMetadata, LayerHooks, StepLayout
from workers.executor.kv_pool import StagingRing
from workers.executor.model import CausalLM

# Columns of a persistent row, then the slot's page and the block table in layer 0.
TOKEN, POSITION, CONTEXT_LEN, SLOT_OFFSET, SLOT_PAGE = range(5)
NUM_FIXED_COLUMNS = 5


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16 up to ``max_num_seqs`` (itself the last size), as vLLM and
    nano-vllm capture."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}.")
    sizes = [size for size in (1, 2, 4, 8) if size < max_num_seqs]
    sizes += [size for size in range(16, max_num_seqs, 16)]
    return sizes + [max_num_seqs]


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds ``num_seqs`` sequences (None: too many)."""
    return next((size for size in sizes if size >= num_seqs), None)


class DecodeGraphs:
    """Persistent decode inputs for every captured size, and (``capture``) their CUDA graphs.

    ``pages``: the whole pool, ``scratch_page`` its last page (reserved for padding); ``staging``:
    the ring host blocks stream through (None: no host tier). ``max_blocks``: block-table width,
    enough for the model length. ``sizes`` replaces ``capture_sizes(max_num_seqs)`` (benchmarks).
    """

    def __init__(
        self,
        model: CausalLM,
        pages: torch.Tensor,
        block_size: int,
        num_device_blocks: int,
        staging: StagingRing | None,
        max_num_seqs: int,
        max_blocks: int,
        sizes: list[int] | None = None,
    ) -> None:
        if pages.shape[0] <= model.config.num_layers * num_device_blocks + (
            staging.num_pages if staging else 0
        ):
            raise ValueError("the pool needs a scratch page after the device and staging pages.")
        self.model = model
        self.pages = pages
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.staging = staging
        self.scratch_page = pages.shape[0] - 1
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_num_seqs)  # sizes: benchmarks only
        self.max_blocks = max_blocks
        device = pages.device
        num_rows = self.sizes[-1]
        shape = (num_rows, NUM_FIXED_COLUMNS + max_blocks)
        # NOTE: pinned, so the rows' copy is asynchronous. It is rewritten only after the host has
        # synchronized on the previous step's sampled tokens, which the stream ordered after its copy.
        self.host_rows = torch.empty(shape, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.host_view = self.host_rows.numpy()
        self.padding_row = self._padding_row()
        self.host_view[:] = self.padding_row
        self.rows = self.host_rows.to(device)
        self.row_ids = torch.arange(num_rows + 1, device=device)
        self.zeros = torch.zeros(num_rows, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.piece_outputs: dict[int, torch.Tensor] = {}
        self.num_runs: Counter[int] = Counter()  # steps run per padded size (for tests and benchmarks)

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def _padding_row(self) -> np.ndarray:
        row = np.full(NUM_FIXED_COLUMNS + self.max_blocks, self.scratch_page, dtype=np.int64)
        row[[TOKEN, POSITION, SLOT_OFFSET]] = 0
        row[CONTEXT_LEN] = 1  # attends to the scratch page's first slot, which it just wrote
        return row

    def accepts(self, layout: StepLayout) -> bool:
        """A decode step that fits the captured sizes and the block-table width."""
        return (
            layout.is_decode
            and layout.num_seqs <= self.sizes[-1]
            and layout.block_tables.shape[1] <= self.max_blocks
        )

    def prepare(self, layout: StepLayout, token_ids: np.ndarray) -> int:
        """Write a decode step's rows (one host-to-device copy); returns the padded batch size."""
        num_seqs = layout.num_seqs
        batch = padded_size(num_seqs, self.sizes)
        assert batch is not None and self.accepts(layout)
        rows = self.host_view[:batch]
        rows[num_seqs:] = self.padding_row
        real = rows[:num_seqs]
        real[:, TOKEN] = token_ids
        real[:, POSITION] = layout.positions
        real[:, CONTEXT_LEN] = layout.context_lens
        real[:, SLOT_OFFSET] = layout.slot_offsets
        if layout.stream:  # host blocks: layer 0's pages are their slots in area 0
            block_pages, slot_pages = (
                layout.stream["ring_block_tables"][0],
                layout.stream["ring_slot_blocks"][0],
            )
        else:
            block_pages, slot_pages = layout.block_tables, layout.slot_blocks
        real[:, SLOT_PAGE] = slot_pages
        width = block_pages.shape[1]
        real[:, NUM_FIXED_COLUMNS : NUM_FIXED_COLUMNS + width] = block_pages
        real[:, NUM_FIXED_COLUMNS + width :] = self.scratch_page
        self.rows[:batch].copy_(self.host_rows[:batch], non_blocking=True)
        return batch

    def metadata(self, batch: int, hooks: LayerHooks | None) -> AttentionMetadata:
        """The step's ``AttentionMetadata``, derived on the device from the first ``batch`` rows
        (inside the graph when captured). Block ids are pages of layer 0 here: a device block has
        stride D across layers, a staging page moves one area per layer, the scratch page stays."""
        rows = self.rows[:batch]
        first_pages = rows[:, SLOT_PAGE:]  # [batch, 1 + max_blocks]: the slot, then the block table
        is_device = first_pages < self.num_device_blocks
        strides = is_device * self.num_device_blocks
        if self.staging is None:
            rings = first_pages[None]
        else:
            first, last = self.staging.first_page, self.staging.first_page + self.staging.area_size
            in_staging = (first_pages >= first) & (first_pages < last)
            rings = torch.stack(
                [
                    first_pages + in_staging * (area * self.staging.area_size)
                    for area in range(self.staging.num_areas)
                ]
            )
        positions = rows[:, POSITION].contiguous()
        group = AttentionGroup(
            num_seqs=batch,
            num_tokens=batch,
            max_query_len=1,
            num_blocks=self.max_blocks,
            seq_ids=None,
            token_rows=None,
            token_seq_ids=self.row_ids[:batch],
            token_query_ids=self.zeros[:batch],
            padded_query_positions=positions[:, None],
        )
        return AttentionMetadata(
            num_seqs=batch,
            num_tokens=batch,
            max_query_len=1,
            max_context_len=self.max_blocks * self.block_size,
            block_size=self.block_size,
            num_device_blocks=self.num_device_blocks,
            positions=positions,
            query_start_loc=self.row_ids[: batch + 1],
            context_lens=rows[:, CONTEXT_LEN].contiguous(),
            block_tables=rings[0, :, 1:],
            slot_blocks=rings[0, :, 0],
            slot_offsets=rows[:, SLOT_OFFSET].contiguous(),
            groups=[group],
            ring_block_tables=rings[:, :, 1:],
            block_strides=strides[:, 1:],
            ring_slot_blocks=rings[:, :, 0],
            slot_strides=strides[:, 0],
            stream=hooks,
        )

    def _forward(self, batch: int, hooks: LayerHooks | None) -> torch.Tensor:
        """Logits ``[batch, vocab]`` of the first ``batch`` rows: what a graph of that size holds."""
        meta = self.metadata(batch, hooks)
        input_ids = self.rows[:batch, TOKEN]
        with torch.inference_mode():
            return self.model(input_ids, meta.positions, meta, self.pages, self.row_ids[:batch])

    def run(self, batch: int, hooks: LayerHooks | None) -> torch.Tensor:
        """Logits of the padded batch whose rows ``prepare`` wrote: replayed when captured, else
        computed by the same function the graphs hold. Valid until the next run."""
        self.num_runs[batch] += 1
        if not self.captured:
            return self._forward(batch, hooks)
        if hooks is None:
            self.graphs[batch].replay()
            return self.outputs[batch]
        pieces = self.pieces[batch]
        for layer in range(self.model.config.num_layers):
            pieces[2 * layer].replay()
            hooks.before_attention(layer)
            pieces[2 * layer + 1].replay()
            hooks.after_attention(layer)
        pieces[-1].replay()
        return self.piece_outputs[batch]

    def capture(self) -> None:
        """Capture every size, largest first into one shared pool (smaller graphs reuse its memory):
        the whole forward pass, and with a staging ring its ``2L + 1`` pieces too. The rows hold
        padding only, so warm-up and capture write nothing but the scratch page."""
        assert self.pages.device.type == "cuda", "CUDA graphs need a CUDA device"
        self.host_view[:] = self.padding_row
        self.rows.copy_(self.host_rows)
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.sizes):
            self._forward(batch, None)  # warm-up: compiles the Triton kernels outside the capture
            torch.cuda.synchronize(self.pages.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self._forward(batch, None)
            self.graphs[batch] = graph
            if self.staging is not None:
                self._capture_pieces(batch, pool)

    def _capture_pieces(self, batch: int, pool: tuple[int, int]) -> None:
        splitter = PieceSplitter(pool, torch.cuda.CUDAGraph)
        stream = torch.cuda.Stream(self.pages.device)
        stream.wait_stream(torch.cuda.current_stream(self.pages.device))
        with torch.cuda.stream(stream):
            splitter.begin()
            self.piece_outputs[batch] = self._forward(batch, splitter)
            splitter.end()
        torch.cuda.current_stream(self.pages.device).wait_stream(stream)
        assert len(splitter.pieces) == 2 * self.model.config.num_layers + 1
        self.pieces[batch] = splitter.pieces


class PieceSplitter:
    """Layer hooks used while capturing: each hook ends the piece being captured and begins the
    next, so a layer's waits and copy submissions fall between pieces (see the module docs)."""

    def __init__(self, pool: tuple[int, int] | None, new_graph: Callable[[], torch.cuda.CUDAGraph]) -> None:
        self.pool = pool
        self.new_graph = new_graph  # torch.cuda.CUDAGraph (a stand-in in tests)
        self.pieces: list[torch.cuda.CUDAGraph] = []

    def begin(self) -> None:
        piece = self.new_graph()
        piece.capture_begin(pool=self.pool)
        self.pieces.append(piece)

    def end(self) -> None:
        self.pieces[-1].capture_end()

    def before_attention(self, layer: int) -> None:
        self.end()
        self.begin()

    def after_attention(self, layer: int) -> None:
        self.end()
        self.begin()
