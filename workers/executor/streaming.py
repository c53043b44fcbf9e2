"""Performance-transparent swapping: one step's host blocks streamed through the staging ring
(DESIGN.md "Streaming").

A step's host blocks are the same for every layer. ``LayerStreamer`` gives them staging slots
``0..k-1`` (in block id order) and streams each layer's pages through a ring of ``R = depth + 1``
staging areas in the flat device pool: while layer ``l`` computes, the copy engine fills the area
of layer ``l + depth``; before layer ``l``'s attention, compute waits for layer ``l``'s copy (the
time waited is the step's stall); after it, the K/V the step wrote into host blocks is written back
and the area is refilled for layer ``l + R``.

During a step's last layers it loads the next step's first layers (``Prefetch``). The next step
uses whatever of them is still valid: a host block it reads with the same owners as when it was
prefetched keeps its pages (moved on the device to its new slot when blocks joined or left the
step); only the rest is loaded from host.

On CUDA (``use_host_page_kernel``) a layer's loads and write-backs are one launch each of the
host-page kernel (``triton_host_pages``), reading the registered host segments through the step's
static list of page addresses (``HostPageLists``, published by one copy per step); on CPU they are
one ``copy_`` per run of consecutive blocks on the copy thread. Pages a prefetch left only partly
valid are always fixed up by copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from proto.config import ConfigError
from workers.executor.copy_engine import CopyTicket, Work

if TYPE_CHECKING:
    from workers.executor.host_kv import HostKV
    from workers.executor.layer_timer import LayerTimer
    from workers.executor.triton_host_pages import HostPageLists


def use_host_page_kernel(device_type: str, requested: bool | None) -> bool:
    """Whether host pages move by kernel (``requested`` None: on CUDA, where every attached segment
    is registered; True: also on CPU in Triton's interpreter, for tests; False: never). The kernel
    needs triton, and off CUDA ``TRITON_INTERPRET=1`` from the start of the process."""
    if requested is False or (requested is None and device_type != "cuda"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError as error:
        if requested:
            raise ConfigError(f"the host-page kernel needs the triton package ({error}).") from error
        return False
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "the host-page kernel off CUDA runs in Triton's interpreter: set TRITON_INTERPRET=1."
        )
    return True


@dataclass
class StreamStats:
    """What one step moved and waited for (StepResult's host fields, plus the copy engine's busy time)."""

    num_host_blocks: int = 0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    stall_time: float = 0.0
    copy_time: float = 0.0
    num_prefetched_layers: int = 0  # layers whose pages (all or some) the previous step had loaded
    num_prefetched_pages: int = 0  # pages of those layers taken from the prefetch instead of host


HostBlockOwners = dict[int, frozenset[str]]  # host block id -> the requests reading it in one step


@dataclass
class Prefetch:
    """The next step's first layers, loaded during this step's last ones: area ``r`` holds layer
    ``r``'s pages of ``host_block_ids`` (slot = rank), valid for a block while the same requests
    hold it (see ``LayerStreamer.start``)."""

    host_block_ids: np.ndarray
    owners: HostBlockOwners
    tickets: list[CopyTicket]  # layer 0..R-1's loads, one per ring area

    def invalidate(self, host_block_ids: list[int]) -> None:
        """These host blocks' pages were rewritten after the prefetch read them (swap_out)."""
        for block_id in host_block_ids:
            self.owners.pop(block_id, None)


class LayerStreamer:
    """One step's host blocks streamed through the staging ring; the hooks every layer calls."""

    def __init__(
        self,
        host_kv: HostKV,
        host_block_ids: np.ndarray,
        written_host_block_ids: np.ndarray,
        owners: HostBlockOwners | None = None,
    ) -> None:
        ring = host_kv.ring
        assert ring is not None
        self.host_kv = host_kv
        self.engine = host_kv.engine
        self.ring = ring
        self.host_block_ids = host_block_ids
        self.owners = owners  # None: no prefetch is adopted or offered
        self.num_layers = host_kv.layout.num_layers
        self.page_bytes = host_kv.layout.page_bytes
        self.prefetch_next = False  # set by the runner when the next plan is predictable (needs owners)
        self.timer: LayerTimer | None = None  # set by the runner on a step whose layers are traced
        first = host_kv.num_device_blocks
        host_indices = (host_block_ids - first).tolist()
        written_indices = (written_host_block_ids - first).tolist()
        slots = {host_index: slot for slot, host_index in enumerate(host_indices)}
        # (host pages of every layer [L, count, ...], first staging slot, count): one copy per layer.
        self.load_runs = self._runs(host_indices, list(range(len(host_indices))))
        # Consecutive host indices that are both in the step have consecutive slots too.
        self.write_runs = [
            (segment.tensor[:, offset : offset + count], slots[written_indices[position]], count)
            for segment, offset, count, position in host_kv.pool.runs(written_indices)
        ]
        # The kernel path: the step's address lists, published before its first load (see start).
        self.page_lists: HostPageLists | None = host_kv.page_lists
        self.publish_lists: list[Work] = []
        if self.page_lists is not None:
            self.written_slots = [slots[host_index] for host_index in written_indices]
            self.publish_lists = [self.page_lists.fill(host_kv.pool, host_indices, self.written_slots)]
        self.load_bytes = len(host_indices) * self.page_bytes
        self.write_bytes = len(written_indices) * self.page_bytes
        pages = host_kv.pages
        self.areas = [
            pages[ring.area_start(area) : ring.area_start(area) + ring.area_size]
            for area in range(ring.num_areas)
        ]
        self.loaded: list[CopyTicket | None] = [None] * self.num_layers
        self.tickets: list[CopyTicket] = []  # this step's own batches, for its stats
        self.last_write_back: CopyTicket | None = None
        self.next_tickets: list[CopyTicket] = []
        self.bytes_to_device = 0
        self.bytes_to_host = 0
        self.num_prefetched_layers = 0
        self.num_prefetched_pages = 0

    def _runs(self, host_indices: list[int], slots: list[int]) -> list[tuple[torch.Tensor, int, int]]:
        """(host pages of every layer, first slot, count) per run of sorted ``host_indices`` that
        are consecutive in one segment (their ``slots`` are then consecutive too)."""
        return [
            (segment.tensor[:, offset : offset + count], slots[position], count)
            for segment, offset, count, position in self.host_kv.pool.runs(host_indices)
        ]

    def loads(self, layer: int, runs: list[tuple[torch.Tensor, int, int]] | None = None) -> list[Work]:
        """Host pages of ``layer`` (of ``runs``, default all of the step's) into its staging area."""
        if runs is None and self.page_lists is not None:
            return [self._launch(layer, to_host=False)]
        area = self.areas[layer % self.ring.num_areas]
        runs = self.load_runs if runs is None else runs
        return [(area[slot : slot + count], host[layer]) for host, slot, count in runs]

    def write_backs(self, layer: int) -> list[Work]:
        if not self.write_runs:
            return []
        if self.page_lists is not None:
            return [self._launch(layer, to_host=True)]
        area = self.areas[layer % self.ring.num_areas]
        return [(host[layer], area[slot : slot + count]) for host, slot, count in self.write_runs]

    def _launch(self, layer: int, to_host: bool) -> Work:
        lists, pages, first_page = self.page_lists, self.host_kv.pages, self.ring.area_start(layer)
        assert lists is not None
        # The counts are this step's, bound now: the launch may run after the next step's lists are written.
        count = len(self.written_slots) if to_host else len(self.host_block_ids)
        return lambda: lists.launch(pages, first_page, layer, count, to_host)

    def start(self) -> None:
        """Fill the first ``R`` areas, using what the previous step prefetched into them.

        NOTE: a prefetched page is used only for a block read by the same requests as when it was
        prefetched: while a request holds a host block, only this executor writes it (write-back,
        ordered before the prefetch by the FIFO), and a swap_out into a prefetched block since
        invalidates it (``Prefetch.invalidate``). A block freed and reused by another request
        between the steps changes its owners, so stale pages are never used.
        """
        prefetch = self.host_kv.take_prefetch()
        if prefetch is not None:
            # Moved either way: used here, or wasted (NOTE: its copies run before ours, FIFO, so
            # our loads overwrite what it staged).
            self.bytes_to_device += sum(ticket.num_bytes for ticket in prefetch.tickets)
            if self.owners is not None:
                self._adopt(prefetch)
        if self.publish_lists:
            # NOTE: the step's address lists go first, ahead of every launch that reads them (FIFO);
            # the previous step's prefetch launches, queued earlier, still read its own.
            self._submit(self.publish_lists, 0, 0)
        for layer in range(min(self.ring.num_areas, self.num_layers)):
            if self.loaded[layer] is None:
                self.loaded[layer] = self._submit(self.loads(layer), self.load_bytes, 0)

    def _adopt(self, prefetch: Prefetch) -> None:
        """Take the prefetched pages still valid for this step: in place when no slot moved (the
        usual decode step: the same blocks), else gathered on the device into their new slots; the
        rest is loaded from host."""
        assert self.owners is not None
        old_ids, new_ids = prefetch.host_block_ids, self.host_block_ids
        old_slots = np.searchsorted(old_ids, new_ids)
        found = old_slots < len(old_ids)
        found[found] = old_ids[old_slots[found]] == new_ids[found]
        valid = [
            bool(is_found) and prefetch.owners.get(block_id) == self.owners.get(block_id)
            for is_found, block_id in zip(found.tolist(), new_ids.tolist())
        ]
        kept = np.flatnonzero(valid)
        if len(kept) == 0:
            return
        missing = np.flatnonzero(np.logical_not(valid))
        first = self.host_kv.num_device_blocks
        missing_runs = self._runs((new_ids[missing] - first).tolist(), missing.tolist())
        moved = not np.array_equal(old_slots[kept], kept)
        if moved:
            device = self.host_kv.device
            new_slots, from_slots = (
                torch.from_numpy(kept).to(device),
                torch.from_numpy(old_slots[kept]).to(device),
            )
        for layer, ticket in enumerate(prefetch.tickets):
            self.tickets.append(ticket)
            if moved:
                # NOTE: compute waits for the prefetch, gathers on its own stream (a temporary, so
                # overlapping moves are safe), and the loads below are ordered after the gather.
                self.engine.wait(ticket)
                area = self.areas[layer]
                area[new_slots] = area[from_slots]
            if len(missing):
                self.loaded[layer] = self._submit(
                    self.loads(layer, missing_runs), len(missing) * self.page_bytes, 0
                )
            else:
                self.loaded[layer] = ticket
        self.num_prefetched_layers = len(prefetch.tickets)
        self.num_prefetched_pages = len(prefetch.tickets) * len(kept)

    def before_attention(self, layer: int) -> None:
        ticket = self.loaded[layer]
        assert ticket is not None, f"layer {layer}'s host blocks were never loaded"
        if self.timer is not None:
            self.timer.wait(layer, ticket, self.engine)
        else:
            self.engine.wait(ticket)

    def after_attention(self, layer: int) -> None:
        # NOTE: write-back and refill are one batch, write-back first: the area's new K/V reaches
        # the host before the next layer's pages overwrite it.
        transfers = self.write_backs(layer)
        next_layer = layer + self.ring.num_areas
        refill = next_layer < self.num_layers
        if self.timer is not None and transfers:
            # A traced step writes back in a batch of its own, so its span is its own time (the
            # copy engine's FIFO keeps it before the refill all the same).
            ticket = self._submit(transfers, 0, self.write_bytes)
            self.last_write_back = ticket
            self.timer.wrote_back(layer, ticket)
            transfers = []
        if refill:
            transfers += self.loads(next_layer)
        if transfers:
            written = self.write_bytes if self.timer is None else 0
            ticket = self._submit(transfers, self.load_bytes if refill else 0, written)
            if refill:
                self.loaded[next_layer] = ticket
            if self.write_runs and self.timer is None:
                self.last_write_back = ticket
        if not refill and self.prefetch_next and self.owners is not None:
            # This was the area's last use in the step: load the next step's layer that maps to it.
            next_step_layer = layer % self.ring.num_areas
            self.next_tickets.append(self.engine.submit(self.loads(next_step_layer), self.load_bytes))

    def finish(self, completed: bool) -> None:
        """Wait until this step's write-backs are on the host (after a failed forward pass: until
        every copy is done); hand a complete prefetch to the next step."""
        if not completed:
            self.engine.synchronize()
        elif self.last_write_back is not None:
            self.engine.synchronize(self.last_write_back)
        if completed and self.owners is not None and len(self.next_tickets) == self.ring.num_areas:
            # Areas free up in the order of their last use, which is layer order 0..R-1 only when
            # L % R == 0.
            layers = [
                layer % self.ring.num_areas
                for layer in range(self.num_layers - self.ring.num_areas, self.num_layers)
            ]
            tickets = [
                ticket for _, ticket in sorted(zip(layers, self.next_tickets), key=lambda pair: pair[0])
            ]
            self.host_kv.prefetched = Prefetch(self.host_block_ids, self.owners, tickets)

    def stats(self) -> StreamStats:
        """Valid once compute has finished (the host synchronized with it) and after ``finish``."""
        return StreamStats(
            num_host_blocks=len(self.host_block_ids),
            bytes_to_device=self.bytes_to_device,
            bytes_to_host=self.bytes_to_host,
            stall_time=sum(ticket.stall_time() for ticket in self.tickets),
            copy_time=sum(ticket.copy_time() for ticket in self.tickets),
            num_prefetched_layers=self.num_prefetched_layers,
            num_prefetched_pages=self.num_prefetched_pages,
        )

    def _submit(self, transfers: list[Work], bytes_to_device: int, bytes_to_host: int) -> CopyTicket:
        ticket = self.engine.submit(transfers, bytes_to_device + bytes_to_host)
        self.tickets.append(ticket)
        self.bytes_to_device += bytes_to_device
        self.bytes_to_host += bytes_to_host
        return ticket
