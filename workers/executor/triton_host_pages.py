"""Host pages to and from the staging ring by kernel (DESIGN.md "Loads on CUDA").

One launch per layer moves every host page a step uses: a program copies one chunk of one page,
reading (or writing) host memory through the page's address. Addresses travel as a device-side
int64 list (each page's address in layer 0 and its segment's layer stride, in bytes), built once
per step, so there is no Python loop over blocks or runs per layer, and the launch can be captured
in a CUDA graph with the lists in static buffers. On CUDA the host segments must be registered
(pinned and device-mapped) and the addresses the device-side ones; under Triton's interpreter on
CPU the same kernel reads the segments' own addresses, which is how it is tested.

``HostPageLists`` holds a step's lists in one static device buffer (written by one copy per step);
``LayerStreamer`` (streaming.py) launches the kernel through it for each layer's loads and
write-backs on CUDA (``use_host_page_kernel``), and keeps its ``copy_`` per run of blocks on CPU.
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


class HostPageLists:
    """A step's host pages as static device lists, for ``copy_host_pages``: rows are the slots
    (0..k-1), the pages' addresses and layer strides, then the written pages' slots, addresses and
    layer strides. ``area_size`` (M) entries each; one pinned host copy, one transfer per step."""

    SLOTS, ADDRESSES, STRIDES, WRITTEN_SLOTS, WRITTEN_ADDRESSES, WRITTEN_STRIDES = range(6)

    def __init__(self, area_size: int, device: torch.device) -> None:
        self.area_size = area_size
        self.host = torch.zeros((6, area_size), dtype=torch.int64, pin_memory=device.type == "cuda")
        # Its own buffer on CPU too: launches still queued read the lists they were queued with.
        self.device_lists = torch.zeros((6, area_size), dtype=torch.int64, device=device)

    def fill(
        self, pool: HostPool, host_indices: list[int], written_positions: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's lists (``written_positions``: slots of the written pages among
        ``host_indices``); returns the (device, host) transfer that publishes them, to be queued on
        the copy engine before the step's first launch (and after the previous step's last). NOTE:
        the host rows are rewritten only once the previous step's transfer ran (it precedes that
        step's loads, which compute waited for)."""
        if len(host_indices) > self.area_size:
            raise ValueError(f"{len(host_indices)} host pages do not fit lists of {self.area_size}.")
        lists = self.host.numpy()
        count, written = len(host_indices), len(written_positions)
        addresses, strides = host_page_addresses(pool, host_indices)
        lists[self.SLOTS, :count] = np.arange(count)
        lists[self.ADDRESSES, :count] = addresses
        lists[self.STRIDES, :count] = strides
        lists[self.WRITTEN_SLOTS, :written] = written_positions
        lists[self.WRITTEN_ADDRESSES, :written] = addresses[written_positions]
        lists[self.WRITTEN_STRIDES, :written] = strides[written_positions]
        return self.device_lists, self.host

    def launch(self, pages: torch.Tensor, first_page: int, layer: int, count: int, to_host: bool) -> None:
        """Load the first ``count`` listed pages of ``layer`` into the area at ``first_page`` (or,
        ``to_host``, write the first ``count`` written pages back): one kernel launch."""
        rows = self.device_lists[3:] if to_host else self.device_lists[:3]
        copy_host_pages(pages, first_page, rows[0, :count], rows[1, :count], rows[2, :count], layer, to_host)
