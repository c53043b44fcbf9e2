"""The host-page kernel (``workers/executor/triton_host_pages.py``) against the copy engine's
transfers (``LayerStreamer.loads``/``write_backs``), in Triton's interpreter on CPU: the same bytes
land in the same staging pages, and written-back pages in the same host pages, for every layer.
The kernel reads the host segments (separate memfd mappings) through raw addresses, as it will read
registered host memory on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from workers.executor.host_kv import HostKV  # noqa: E402
from workers.executor.kv_pool import StagingRing  # noqa: E402
from workers.executor.triton_host_pages import copy_host_pages, host_page_addresses  # noqa: E402
from workers.memory.host_pool import HostSegment, KVLayout, local_segment_fds  # noqa: E402

NUM_LAYERS, NUM_DEVICE_BLOCKS, BLOCKS_PER_SEGMENT = 3, 4, 5
# On CUDA the segments are registered (mapped: the default on a UVA system) and the kernel reads
# them through their host addresses, which a GPU with CanUseHostPointerForRegisteredMem accepts.
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    block_size=st.sampled_from([1, 4, 16]),
    host_indices=st.sets(st.integers(0, 3 * BLOCKS_PER_SEGMENT - 1), min_size=1, max_size=8),
    written_fraction=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_moves_the_pages_the_copy_engine_moves(
    device, dtype, block_size, host_indices, written_fraction, seed
):
    layout = KVLayout(NUM_LAYERS, block_size, 2, 24, dtype)
    generator = torch.Generator().manual_seed(seed)
    host_indices = sorted(host_indices)
    ring = StagingRing(NUM_LAYERS * NUM_DEVICE_BLOCKS, 2, len(host_indices))
    pages = torch.zeros(NUM_LAYERS * NUM_DEVICE_BLOCKS + ring.num_pages, *layout.page_shape, dtype=dtype, device=device)
    host_kv = HostKV(layout, pages, NUM_DEVICE_BLOCKS, ring, BLOCKS_PER_SEGMENT, torch.device(device))
    segments = [HostSegment.create(i, i * BLOCKS_PER_SEGMENT, BLOCKS_PER_SEGMENT, layout) for i in range(3)]
    try:
        host_kv.attach([segment.info for segment in segments], local_segment_fds(segments))
        for segment in host_kv.pool.segments.values():  # registered at attach, on CUDA
            segment.tensor.copy_(torch.randn(segment.tensor.shape, generator=generator).to(dtype))
        rng = np.random.default_rng(seed)
        written = [h for h in host_indices if rng.random() < written_fraction]
        streamer = host_kv.streamer(
            np.array(host_indices) + NUM_DEVICE_BLOCKS, np.array(written, dtype=np.int64) + NUM_DEVICE_BLOCKS
        )
        addresses, layer_strides = (
            torch.from_numpy(a).to(device) for a in host_page_addresses(host_kv.pool, host_indices)
        )
        slots = torch.arange(len(host_indices), device=device)
        for layer in range(NUM_LAYERS):
            first_page = ring.area_start(layer)
            area = pages[first_page : first_page + ring.area_size]
            before = area.clone()
            for destination, source in streamer.loads(layer):
                destination.copy_(source)
            expected = area.clone()
            assert not torch.equal(expected, before)
            area.copy_(before)  # as it was before the copy engine ran
            copy_host_pages(pages, first_page, slots, addresses, layer_strides, layer, to_host=False, block=256)
            assert torch.equal(area, expected)

            # Write-back: new K/V in the staged pages of written blocks goes to their host pages.
            area.copy_(torch.randn(area.shape, generator=generator).to(device, dtype))
            host_before = [segment.tensor.clone() for segment in host_kv.pool.segments.values()]
            for destination, source in streamer.write_backs(layer):
                destination.copy_(source)
            host_expected = [segment.tensor.clone() for segment in host_kv.pool.segments.values()]
            for segment, before in zip(host_kv.pool.segments.values(), host_before):
                segment.tensor.copy_(before)
            written_positions = [host_indices.index(h) for h in written]
            written_addresses, written_strides = (
                torch.from_numpy(a).to(device) for a in host_page_addresses(host_kv.pool, written)
            )
            copy_host_pages(
                pages,
                first_page,
                torch.tensor(written_positions, dtype=torch.int64, device=device),
                written_addresses,
                written_strides,
                layer,
                to_host=True,
                block=256,
            )
            if device == "cuda":
                torch.cuda.synchronize()  # the kernel wrote host memory behind torch's back
            for segment, expected_host in zip(host_kv.pool.segments.values(), host_expected):
                assert torch.equal(segment.tensor, expected_host)
    finally:
        host_kv.close()
        for segment in segments:
            segment.close()


def test_when_streaming_moves_pages_by_kernel(monkeypatch):
    """By default on CUDA only (every attached segment is registered there); on CPU when asked,
    in Triton's interpreter; never when refused."""
    from proto.config import ConfigError
    from workers.executor.streaming import use_host_page_kernel

    assert use_host_page_kernel("cuda", None) and not use_host_page_kernel("cuda", False)
    assert not use_host_page_kernel("cpu", None) and not use_host_page_kernel("cpu", False)
    assert use_host_page_kernel("cpu", True)  # conftest set TRITON_INTERPRET=1
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        use_host_page_kernel("cpu", True)
