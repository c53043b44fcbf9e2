"""Whole-model decode against the roofline, at an 8B shape (Llama 3 8B: 32 layers, hidden 4096, 32
query heads, 8 kv heads, head dim 128, MLP 14336, vocab 128256, bf16) with random weights built on
the device (nothing downloaded or written to disk).

For batch {1, 16, 64, 256} x context {512, 4096}: decode tok/s through the executor's graph runner
(``workers/executor/graphs.py``: CUDA graphs replayed at the padded batch, as serving runs them),
and the same step eagerly; each step time as a ratio to the roofline (weight bytes + the KV bytes the
step reads, over the HBM bandwidth measured in the same run); the step split into GPU time (CUDA
events) and CPU time (the host's prepare + launch); which attention kernel ran (and its split
count); memory headroom at the largest batch. Prints one JSON line.

    python perf/decode_roofline.py                    # on a CUDA GPU (about a minute)
    TRITON_INTERPRET=1 python perf/decode_roofline.py --tiny   # a tiny shape on CPU: checks the script

Where a batch's KV does not fit the device, sequences share pages (``kv_shared``): the kernel still
reads every sequence's pages, but from fewer distinct bytes, so cache hits may flatter that row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, machine

from workers.executor.attention import StepLayout, make_attention_backend
from workers.executor.graphs import DecodeGraphs
from workers.executor.kv_pool import KVPool
from workers.executor.model import CausalLM
from workers.executor.triton_attention.decode import choose_num_splits
from workers.model_config import ModelConfig

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
BLOCK_SIZE = 16


def model_config(shape: dict) -> ModelConfig:
    """The shape as a Llama config.json in a scratch folder (a placeholder weights file: no weights)."""
    folder = Path(tempfile.mkdtemp(prefix="pied-roofline-"))
    raw = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        **shape,
    )
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "model.safetensors").write_bytes(b"")
    return ModelConfig.from_folder(folder)


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, backend: str) -> CausalLM:
    with torch.device(device):
        model = CausalLM(config, dtype, make_attention_backend(backend, device))
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device, num_bytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write), median of ``repeats``."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        destination.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * num_bytes / statistics.median(times)


def decode_layout(batch: int, context: int, num_device_blocks: int, rng: np.random.Generator) -> StepLayout:
    """One decode token per sequence at position ``context - 1``, pages in random order (wrapping
    around the pool when the batch's KV does not fit: shared pages)."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    block_ids = rng.permutation(batch * blocks_per_seq) % num_device_blocks
    return StepLayout.build(
        np.ones(batch),
        np.full(batch, context - 1),
        np.full(batch, blocks_per_seq),
        block_ids,
        BLOCK_SIZE,
        num_device_blocks,
    )


def time_steps(step, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median GPU seconds per step, median host seconds to prepare and launch it)."""
    step()  # warm-up
    gpu, cpu = [], []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start_event, end_event = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            start_event.record()
        start = time.perf_counter()
        step()
        cpu.append(time.perf_counter() - start)
        if device.type == "cuda":
            end_event.record()
            end_event.synchronize()
            gpu.append(start_event.elapsed_time(end_event) / 1e3)
        else:
            gpu.append(cpu[-1])
    return statistics.median(gpu), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on CPU (checks the script)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kv-gib", type=float, default=40.0, help="device KV pool (8B shape)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        shape, dtype, batches, contexts, repeats = TINY, torch.float32, [1, 4], [32, 128], 2
        backend = "torch"
    else:
        shape, dtype, batches, contexts, repeats = (
            LLAMA3_8B,
            torch.bfloat16,
            [1, 16, 64, 256],
            [512, 4096],
            args.repeats,
        )
        backend = "triton" if device.type == "cuda" else "torch"
    config = model_config(shape)
    model = random_model(config, dtype, device, backend)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    element_size = torch.empty((), dtype=dtype).element_size()
    token_kv_bytes = config.num_layers * 2 * config.num_kv_heads * config.head_dim * element_size
    kv_bytes = (args.kv_gib * (1 << 30)) if device.type == "cuda" else (16 << 20)
    num_device_blocks = int(kv_bytes // (token_kv_bytes * BLOCK_SIZE))
    pool = KVPool(
        config.num_layers,
        num_device_blocks,
        BLOCK_SIZE,
        config.num_kv_heads,
        config.head_dim,
        dtype,
        device,
        num_extra_pages=1,  # the graphs' scratch page
    )
    bandwidth = memory_bandwidth(device, (2 << 30) if device.type == "cuda" else (32 << 20), 5)
    max_blocks = -(-max(contexts) // BLOCK_SIZE)
    graphs = DecodeGraphs(
        model, pool.pages, BLOCK_SIZE, num_device_blocks, None, max(batches), max_blocks, batches
    )
    capture_start = time.perf_counter()
    if device.type == "cuda":
        graphs.capture()
    capture_seconds = time.perf_counter() - capture_start
    rng = np.random.default_rng(0)
    rows = []
    for context in contexts:
        for batch in batches:
            layout = decode_layout(batch, context, num_device_blocks, rng)
            token_ids = rng.integers(0, config.vocab_size, batch)

            def graph_step(layout=layout, token_ids=token_ids, batch=batch) -> None:
                graphs.prepare(layout, token_ids)
                graphs.run(batch, None).argmax(dim=-1)

            def eager_step(batch=batch) -> None:  # the same padded inputs, no graph
                graphs._forward(batch, None).argmax(dim=-1)

            graph_gpu, graph_cpu = time_steps(graph_step, device, repeats)
            eager_gpu, eager_cpu = (
                time_steps(eager_step, device, repeats) if graphs.captured else (None, None)
            )
            roofline = (weight_bytes + batch * context * token_kv_bytes) / bandwidth
            rows.append(
                dict(
                    batch=batch,
                    context=context,
                    kv_shared=batch * -(-context // BLOCK_SIZE) > num_device_blocks,
                    tokens_per_s=round(batch / graph_gpu, 1),
                    step_ms=round(graph_gpu * 1e3, 3),
                    roofline_ms=round(roofline * 1e3, 3),
                    step_over_roofline=round(graph_gpu / roofline, 3),
                    host_ms=round(graph_cpu * 1e3, 3),
                    eager_step_ms=None if eager_gpu is None else round(eager_gpu * 1e3, 3),
                    eager_host_ms=None if eager_cpu is None else round(eager_cpu * 1e3, 3),
                    decode_splits=choose_num_splits(
                        batch, config.num_kv_heads, max_blocks * BLOCK_SIZE, device
                    ),
                )
            )
    memory = {}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        memory = dict(
            total_gib=round(total / (1 << 30), 2),
            free_gib_after_largest_batch=round(free / (1 << 30), 2),
            peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / (1 << 30), 2),
            kv_pool_gib=round(pool.nbytes / (1 << 30), 2),
        )
    emit(
        dict(
            benchmark="decode_roofline",
            machine=machine(),
            shape={
                key: shape[key]
                for key in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "intermediate_size",
                    "vocab_size",
                )
            },
            dtype=str(dtype),
            attention_backend=backend,
            attention_kernel="triton split-K decode"
            if backend == "triton"
            else "torch SDPA over gathered pages",
            cuda_graphs=graphs.captured,
            capture_seconds=round(capture_seconds, 2),
            weight_gib=round(weight_bytes / (1 << 30), 2),
            memory_bandwidth_gb_per_s=round(bandwidth / 1e9, 1),
            memory=memory,
            decode=rows,
        )
    )


if __name__ == "__main__":
    main()
