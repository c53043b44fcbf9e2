"""Paged decode attention, one layer of an 8B-shaped model (32 query heads, 8 kv heads, head dim
128, bf16, 16-token pages in random order): the Triton split-K kernel and the torch backend over
batch {1, 16, 64, 256} x context {512, 4096}, each as a fraction of the roofline (KV bytes read
per call over the HBM bandwidth measured in the same run). Prints one JSON line.

    python perf/attention_kernels.py            # on a CUDA GPU
    TRITON_INTERPRET=1 python perf/attention_kernels.py --quick   # tiny shapes, to check the script on CPU

This is the attention kernel alone; whole-model decode tok/s against the roofline is still to be
built into perf/gpu_check.sh (see issue 14).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import emit, machine

from workers.executor.attention import AttentionMetadata, StepLayout, TorchPagedAttention
from workers.executor.triton_attention import TritonPagedAttention
from workers.executor.triton_attention.decode import choose_num_splits


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call, after a warm-up (which also compiles the kernel)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(device: torch.device, num_bytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    return 2 * num_bytes / timed(lambda: destination.copy_(source), device, repeats)


def measure(batch, context, shape, device, bandwidth, repeats, rng) -> dict:
    """One decode call of ``batch`` sequences at ``context`` tokens, per backend."""
    heads, kv_heads, head_dim, block_size, dtype = shape
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    layout = StepLayout.build(
        np.ones(batch, dtype=np.int64),
        np.full(batch, context - 1),
        np.full(batch, blocks_per_seq),
        rng.permutation(num_blocks),
        block_size,
        num_blocks,
    )
    meta, _ = AttentionMetadata.from_layout(layout, device)
    pool = torch.randn(num_blocks, 2, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    page_table = meta.page_table(0)
    kv_bytes = batch * context * 2 * kv_heads * head_dim * pool.element_size()
    roofline = kv_bytes / bandwidth
    row = dict(
        batch=batch,
        context=context,
        num_splits=choose_num_splits(batch, kv_heads, context, device),
        roofline_us=round(roofline * 1e6, 2),
    )
    for name, backend in (("triton", TritonPagedAttention()), ("torch", TorchPagedAttention())):
        try:
            seconds = timed(lambda: backend.attend(q, pool, page_table, meta, None), device, repeats)  # noqa: B023
        except torch.OutOfMemoryError:  # the torch backend gathers every sequence's KV
            row[f"{name}_us"] = None
            continue
        row[f"{name}_us"] = round(seconds * 1e6, 2)
        row[f"{name}_fraction_of_roofline"] = round(roofline / seconds, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny shapes (for the interpreter on CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        heads, kv_heads, head_dim, block_size, dtype = 4, 2, 64, 16, torch.float32
        batches, contexts, repeats = [1, 4], [64, 256], 2
    else:
        heads, kv_heads, head_dim, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
        batches, contexts, repeats = [1, 16, 64, 256], [512, 4096], args.repeats
    bandwidth = memory_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20), repeats)
    rng = np.random.default_rng(0)
    shape = (heads, kv_heads, head_dim, block_size, dtype)
    results = [
        measure(batch, context, shape, device, bandwidth, repeats, rng) for context in contexts for batch in batches
    ]
    emit(
        dict(
            benchmark="attention_kernels",
            machine=machine(),
            shape=dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=str(dtype)),
            memory_bandwidth_gb_per_s=round(bandwidth / 1e9, 1),
            decode=results,
        )
    )


if __name__ == "__main__":
    main()
