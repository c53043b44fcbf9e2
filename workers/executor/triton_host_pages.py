"""Host pages to and from the staging ring by kernel (DESIGN.md "Loads on CUDA").

One launch per layer moves every host page a step uses: a program copies one chunk of one page,
reading (or writing) host memory through the page's address. Addresses travel as a device-side
int64 list (each page's address in layer 0 and its segment's layer stride, in bytes), built once
per step, so there is no Python loop over blocks or runs per layer, and the launch can be captured
in a CUDA graph with the lists in static buffers. On CUDA the host segments must be registered
(pinned and device-mapped) and the addresses the device-side ones; under Triton's interpreter on
CPU the same kernel reads the segments' own addresses, which is how it is tested.

Not wired into ``streaming.py`` yet: its copy engine (``copy_`` per run of blocks) stays the path
on every device; this kernel is the CUDA replacement for ``LayerStreamer.loads``/``write_backs`` (streaming.py).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from workers.memory.host_pool import HostPool


@triton.jit
def _host_pages_kernel(
    pages_ptr,  # the device pool, [pages, *page_shape], contiguous
    first_page,  # the staging area's first page
    slots_ptr,  # [k] staging slot of each host page
    addresses_ptr,  # [k] int64 byte address of each host page in layer 0
    layer_strides_ptr,  # [k] int64 bytes from one layer's page to the next layer's
    layer,
    PAGE_ELEMENTS: tl.constexpr,
    BLOCK: tl.constexpr,
    TO_HOST: tl.constexpr,
):
    entry = tl.program_id(0)
    elements = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = elements < PAGE_ELEMENTS
    address = tl.load(addresses_ptr + entry) + layer * tl.load(layer_strides_ptr + entry)
    host = address.to(tl.pointer_type(pages_ptr.dtype.element_ty)) + elements
    page = first_page + tl.load(slots_ptr + entry).to(tl.int64)
    device = pages_ptr + page * PAGE_ELEMENTS + elements
    if TO_HOST:
        tl.store(host, tl.load(device, mask=mask), mask=mask)
    else:
        tl.store(device, tl.load(host, mask=mask), mask=mask)


def host_page_addresses(pool: HostPool, host_indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(addresses, layer_strides)`` int64 byte arrays of host blocks ``host_indices``: layer
    ``l``'s page of the i-th is at ``addresses[i] + l * layer_strides[i]``."""
    addresses = np.empty(len(host_indices), dtype=np.int64)
    layer_strides = np.empty(len(host_indices), dtype=np.int64)
    for i, host_index in enumerate(host_indices):
        segment, offset = pool.locate(host_index)
        tensor = segment.tensor
        addresses[i] = tensor[0, offset].data_ptr()
        layer_strides[i] = tensor.stride(0) * tensor.element_size()
    return addresses, layer_strides


def copy_host_pages(
    pages: torch.Tensor,
    first_page: int,
    slots: torch.Tensor,
    addresses: torch.Tensor,
    layer_strides: torch.Tensor,
    layer: int,
    to_host: bool,
    block: int = 1024,
) -> None:
    """Load host pages of ``layer`` into staging pages ``first_page + slots`` (or, ``to_host``,
    write those staging pages back), one launch. ``slots``/``addresses``/``layer_strides``: [k]
    int64 tensors on the pool's device."""
    if not pages.is_contiguous():
        raise ValueError("the page pool must be contiguous.")
    if not len(slots) == len(addresses) == len(layer_strides):
        raise ValueError("slots, addresses and layer_strides must have one entry per host page.")
    if len(slots) == 0:
        return
    page_elements = pages[0].numel()
    grid = (len(slots), triton.cdiv(page_elements, block))
    _host_pages_kernel[grid](
        pages,
        first_page,
        slots,
        addresses,
        layer_strides,
        layer,
        PAGE_ELEMENTS=page_elements,
        BLOCK=block,
        TO_HOST=to_host,
    )
