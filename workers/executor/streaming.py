"""Performance-transparent swapping: the copy engine and the staging ring (DESIGN.md "Streaming").

A step's host blocks are the same for every layer. ``LayerStreamer`` gives them staging slots
``0..k-1`` (in block id order) and streams each layer's pages through a ring of ``R = depth + 1``
staging areas in the flat device pool: while layer ``l`` computes, the copy engine fills the area
of layer ``l + depth``; before layer ``l``'s attention, compute waits for layer ``l``'s copy (the
time waited is the step's stall); after it, the K/V the step wrote into host blocks is written back
and the area is refilled for layer ``l + R``.

``CopyEngine`` runs batches of transfers in submission order, off the compute path: on CUDA a
dedicated copy stream ordered against the compute stream by events (host segments are pinned, copies
are ``non_blocking``), on CPU a copy thread (torch copies release the GIL) signalling events.

``HostKV`` is the executor's side of host memory: the mapped host pool, the copy engine (started on
first use, so a runner that never sees a host block never starts one), the staging ring, whole-block
swaps (the ``swap`` baseline), and the next step's first layers, prefetched during this step's last
layers. The next step uses whatever of them is still valid: a host block it reads with the same
owners as when it was prefetched keeps its pages (moved on the device to its new slot when blocks
joined or left the step); only the rest is loaded from host.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

import proto
from workers.executor.kv_pool import StagingRing
from workers.memory.host_pool import HostPool, HostSegment, KVLayout

Transfer = tuple[torch.Tensor, torch.Tensor]  # (destination, source), same shape, both contiguous


class CopyTicket(ABC):
    """One submitted batch of transfers. ``copy_time``/``stall_time`` are valid once the batch is
    done and every wait on it has run (the host synchronized on both)."""

    def __init__(self, num_bytes: int) -> None:
        self.num_bytes = num_bytes

    @abstractmethod
    def copy_time(self) -> float:
        """Seconds the copy engine spent on the batch (including any throttle)."""

    @abstractmethod
    def stall_time(self) -> float:
        """Seconds compute waited for the batch (0 when it was done in time, or never waited on)."""


class CopyEngine(ABC):
    """Runs batches of transfers in submission order, off the compute path."""

    @abstractmethod
    def submit(self, transfers: list[Transfer], num_bytes: int) -> CopyTicket:
        """Queue ``transfers`` to run, in order, after every earlier batch and after all compute
        issued so far (so a staging area is never overwritten while compute still uses it)."""

    @abstractmethod
    def wait(self, ticket: CopyTicket) -> None:
        """Make compute wait for ``ticket`` (the stall is recorded on the ticket)."""

    @abstractmethod
    def synchronize(self, ticket: CopyTicket | None = None) -> None:
        """Block the host until ``ticket`` (default: every batch submitted so far) is done."""

    @abstractmethod
    def close(self) -> None:
        """Finish what is queued and stop."""


class _ThreadTicket(CopyTicket):
    def __init__(self, transfers: list[Transfer], num_bytes: int) -> None:
        super().__init__(num_bytes)
        self.transfers = transfers
        self.done = threading.Event()
        self.busy = 0.0  # written by the copy thread before ``done`` is set
        self.waited = 0.0

    def copy_time(self) -> float:
        return self.busy

    def stall_time(self) -> float:
        return self.waited


class _CopyWorker:
    """The copy thread's side: a FIFO of batches. Holds no reference to its engine, so an engine
    nobody closed is still collected, and its thread told to stop."""

    def __init__(self, throttle_bytes_per_s: float | None) -> None:
        self.queue: queue.SimpleQueue[_ThreadTicket | None] = queue.SimpleQueue()
        self.throttle_bytes_per_s = throttle_bytes_per_s
        self.error: BaseException | None = None

    def run(self) -> None:
        while (ticket := self.queue.get()) is not None:
            start = time.perf_counter()
            if self.error is None:  # after a failure, batches are only marked done
                try:
                    for destination, source in ticket.transfers:
                        destination.copy_(source)
                except BaseException as error:  # noqa: BLE001 - reported to compute by wait/synchronize
                    self.error = error
                if self.throttle_bytes_per_s:
                    remaining = ticket.num_bytes / self.throttle_bytes_per_s - (time.perf_counter() - start)
                    time.sleep(max(0.0, remaining))
            ticket.busy = time.perf_counter() - start
            ticket.transfers = []  # drop the views: a detached segment must not stay mapped through them
            # NOTE: set after the copies: a waiter that sees ``done`` sees the copied pages.
            ticket.done.set()


class ThreadCopyEngine(CopyEngine):
    """CPU: one copy thread works through a FIFO of batches. ``throttle_bytes_per_s`` (tests only)
    caps its bandwidth by sleeping after each batch, to create stalls on purpose."""

    def __init__(self, throttle_bytes_per_s: float | None = None) -> None:
        self.throttle_bytes_per_s = throttle_bytes_per_s
        self._worker = _CopyWorker(throttle_bytes_per_s)
        self._last: _ThreadTicket | None = None
        self._thread = threading.Thread(target=self._worker.run, name="pied-copy", daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, self._worker.queue.put, None)

    def submit(self, transfers: list[Transfer], num_bytes: int) -> CopyTicket:
        # NOTE: CPU compute is synchronous, so everything issued so far is already done: FIFO order
        # is all the ordering a batch needs.
        ticket = _ThreadTicket(transfers, num_bytes)
        self._worker.queue.put(ticket)
        self._last = ticket
        return ticket

    def wait(self, ticket: CopyTicket) -> None:
        assert isinstance(ticket, _ThreadTicket)
        if not ticket.done.is_set():
            start = time.perf_counter()
            ticket.done.wait()
            ticket.waited += time.perf_counter() - start
        self._raise_if_failed()

    def synchronize(self, ticket: CopyTicket | None = None) -> None:
        if ticket is None:
            ticket = self._last
        if ticket is not None:
            assert isinstance(ticket, _ThreadTicket)
            ticket.done.wait()
        self._raise_if_failed()

    def close(self) -> None:
        self._stop()  # queues the stop marker once, behind every batch
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._worker.error is not None:
            raise RuntimeError("the host KV copy thread failed") from self._worker.error


class _CudaTicket(CopyTicket):
    def __init__(self, num_bytes: int) -> None:
        super().__init__(num_bytes)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.arrival: torch.cuda.Event | None = None  # when compute reached its wait

    def copy_time(self) -> float:
        return self.start.elapsed_time(self.end) / 1e3

    def stall_time(self) -> float:
        if self.arrival is None:
            return 0.0
        return max(0.0, self.arrival.elapsed_time(self.end) / 1e3)


class CudaCopyEngine(CopyEngine):
    """CUDA: a dedicated copy stream; batches are ordered after compute by events, never by the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def submit(self, transfers: list[Transfer], num_bytes: int) -> CopyTicket:
        ticket = _CudaTicket(num_bytes)
        # NOTE: the copy stream waits for everything the compute stream has been given so far (the
        # staging area's last reader, the new K/V to write back), then copies in stream order.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            ticket.start.record(self.stream)
            for destination, source in transfers:
                destination.copy_(source, non_blocking=True)
            ticket.end.record(self.stream)
        return ticket

    def wait(self, ticket: CopyTicket) -> None:
        assert isinstance(ticket, _CudaTicket)
        compute = torch.cuda.current_stream(self.device)
        ticket.arrival = torch.cuda.Event(enable_timing=True)
        ticket.arrival.record(compute)
        compute.wait_event(ticket.end)

    def synchronize(self, ticket: CopyTicket | None = None) -> None:
        if ticket is None:
            self.stream.synchronize()
        else:
            assert isinstance(ticket, _CudaTicket)
            ticket.end.synchronize()

    def close(self) -> None:
        self.stream.synchronize()


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
class _Prefetch:
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

    def loads(self, layer: int, runs: list[tuple[torch.Tensor, int, int]] | None = None) -> list[Transfer]:
        """Host pages of ``layer`` (of ``runs``, default all of the step's) into its staging area."""
        area = self.areas[layer % self.ring.num_areas]
        runs = self.load_runs if runs is None else runs
        return [(area[slot : slot + count], host[layer]) for host, slot, count in runs]

    def write_backs(self, layer: int) -> list[Transfer]:
        area = self.areas[layer % self.ring.num_areas]
        return [(host[layer], area[slot : slot + count]) for host, slot, count in self.write_runs]

    def start(self) -> None:
        """Fill the first ``R`` areas, using what the previous step prefetched into them.

        NOTE: a prefetched page is used only for a block read by the same requests as when it was
        prefetched: while a request holds a host block, only this executor writes it (write-back,
        ordered before the prefetch by the FIFO), and a swap_out into a prefetched block since
        invalidates it (``_Prefetch.invalidate``). A block freed and reused by another request
        between the steps changes its owners, so stale pages are never used.
        """
        prefetch = self.host_kv.take_prefetch()
        if prefetch is not None:
            # Moved either way: used here, or wasted (NOTE: its copies run before ours, FIFO, so
            # our loads overwrite what it staged).
            self.bytes_to_device += sum(ticket.num_bytes for ticket in prefetch.tickets)
            if self.owners is not None:
                self._adopt(prefetch)
        for layer in range(min(self.ring.num_areas, self.num_layers)):
            if self.loaded[layer] is None:
                self.loaded[layer] = self._submit(self.loads(layer), self.load_bytes, 0)

    def _adopt(self, prefetch: _Prefetch) -> None:
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
        self.engine.wait(ticket)

    def after_attention(self, layer: int) -> None:
        # NOTE: write-back and refill are one batch, write-back first: the area's new K/V reaches
        # the host before the next layer's pages overwrite it.
        transfers = self.write_backs(layer)
        next_layer = layer + self.ring.num_areas
        refill = next_layer < self.num_layers
        if refill:
            transfers += self.loads(next_layer)
        if transfers:
            ticket = self._submit(transfers, self.load_bytes if refill else 0, self.write_bytes)
            if refill:
                self.loaded[next_layer] = ticket
            if self.write_runs:
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
            self.host_kv.prefetched = _Prefetch(self.host_block_ids, self.owners, tickets)

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

    def _submit(self, transfers: list[Transfer], bytes_to_device: int, bytes_to_host: int) -> CopyTicket:
        ticket = self.engine.submit(transfers, bytes_to_device + bytes_to_host)
        self.tickets.append(ticket)
        self.bytes_to_device += bytes_to_device
        self.bytes_to_host += bytes_to_host
        return ticket


class HostKV:
    """The executor's side of host KV: mapped segments, the copy engine, the staging ring, swaps."""

    def __init__(
        self,
        layout: KVLayout,
        pages: torch.Tensor,
        num_device_blocks: int,
        ring: StagingRing | None,
        blocks_per_segment: int,
        device: torch.device,
        throttle_bytes_per_s: float | None = None,
    ) -> None:
        self.layout = layout
        self.pages = pages
        self.num_device_blocks = num_device_blocks
        self.ring = ring
        self.pool = HostPool(layout, blocks_per_segment)
        self.device = device
        self.throttle_bytes_per_s = throttle_bytes_per_s
        self.prefetched: _Prefetch | None = None
        self._engine: CopyEngine | None = None

    @property
    def engine(self) -> CopyEngine:
        """Started on first use: a runner without host blocks never has a copy thread or stream."""
        if self._engine is None:
            if self.device.type == "cuda":
                self._engine = CudaCopyEngine(self.device)
            else:
                self._engine = ThreadCopyEngine(self.throttle_bytes_per_s)
        return self._engine

    def attach(self, infos: list[proto.HostSegmentInfo]) -> None:
        for info in infos:
            segment = HostSegment.attach(info, self.layout)
            try:
                if self.device.type == "cuda":
                    segment.pin()
                self.pool.add(segment)
            except BaseException:
                segment.close()
                raise

    def detach(self, segment_ids: list[int]) -> None:
        # NOTE: nothing may still read or write a segment when it is unmapped: drain the copy engine
        # (a prefetch may be in flight) and forget the prefetch, whose views point into it.
        self.drain()
        for segment_id in segment_ids:
            self.pool.remove(segment_id)

    def drain(self) -> None:
        """Every submitted copy done, no prefetch kept."""
        self.prefetched = None
        if self._engine is not None:
            self._engine.synchronize()

    def close(self) -> None:
        self.drain()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self.pool.close()

    def measure_link_bandwidth(self, max_bytes: int = 32 << 20, repeats: int = 3) -> float:
        """Host -> device bytes/s through this copy engine, from pinned host pages into the staging
        ring (unused before the first step): the controller's prior, so its first decision can jump
        instead of growing blindly until stalls reveal the link. 0 without a staging ring."""
        if self.ring is None:
            return 0.0
        count = max(1, min(self.ring.num_pages, max_bytes // self.layout.page_bytes))
        staging = self.pages[self.ring.first_page : self.ring.first_page + count]
        source = torch.zeros(staging.shape, dtype=staging.dtype, pin_memory=self.device.type == "cuda")
        num_bytes = count * self.layout.page_bytes
        self.engine.synchronize(self.engine.submit([(staging, source)], num_bytes))  # warm-up
        seconds = 0.0
        for _ in range(repeats):
            ticket = self.engine.submit([(staging, source)], num_bytes)
            self.engine.synchronize(ticket)
            seconds += ticket.copy_time()
        # Stopped again: the engine starts on the first step that streams, as it would have.
        self._engine.close()
        self._engine = None
        return repeats * num_bytes / seconds if seconds > 0 else 0.0

    def take_prefetch(self) -> _Prefetch | None:
        prefetch, self.prefetched = self.prefetched, None
        return prefetch

    def streamer(
        self,
        host_block_ids: np.ndarray,
        written_host_block_ids: np.ndarray,
        owners: HostBlockOwners | None = None,
    ) -> LayerStreamer:
        return LayerStreamer(self, host_block_ids, written_host_block_ids, owners)

    def swap(self, swap_out: np.ndarray, swap_in: np.ndarray) -> StreamStats:
        """Copy whole blocks (every layer) across tiers, ``swap_out`` (device -> host) first, then
        ``swap_in`` (host -> device); the host waits until both are done. Pairs are ``[k, 2]``."""
        # NOTE: swap_out writes host blocks a prefetch may have read: those pages are stale now.
        if self.prefetched is not None and len(swap_out):
            self.prefetched.invalidate(swap_out[:, 1].tolist())
        transfers = self._block_copies(swap_out, to_host=True) + self._block_copies(swap_in, to_host=False)
        stats = StreamStats(
            bytes_to_host=len(swap_out) * self.layout.block_bytes,
            bytes_to_device=len(swap_in) * self.layout.block_bytes,
        )
        if transfers:
            ticket = self.engine.submit(transfers, stats.bytes_to_host + stats.bytes_to_device)
            self.engine.synchronize(ticket)
            stats.copy_time = ticket.copy_time()
        return stats

    def _block_copies(self, pairs: np.ndarray, to_host: bool) -> list[Transfer]:
        """One transfer per layer per run of pairs whose device blocks and host slots both advance by one."""
        if len(pairs) == 0:
            return []
        num_device_blocks = self.num_device_blocks
        device_ids, host_ids = (pairs[:, 0], pairs[:, 1]) if to_host else (pairs[:, 1], pairs[:, 0])
        direction = "swap_out (device -> host)" if to_host else "swap_in (host -> device)"
        if device_ids.min() < 0 or device_ids.max() >= num_device_blocks:
            raise ValueError(f"{direction}: device block ids must be in [0, {num_device_blocks}).")
        if host_ids.min() < num_device_blocks:
            raise ValueError(f"{direction}: host block ids must be at least {num_device_blocks}.")
        runs: list[tuple[HostSegment, int, int, int]] = []  # (segment, offset, device block, count)
        for device_id, host_id in zip(device_ids.tolist(), host_ids.tolist()):
            segment, offset = self.pool.locate(host_id - num_device_blocks)
            if runs:
                last_segment, last_offset, last_device, count = runs[-1]
                if (
                    last_segment is segment
                    and last_offset + count == offset
                    and last_device + count == device_id
                ):
                    runs[-1] = (segment, last_offset, last_device, count + 1)
                    continue
            runs.append((segment, offset, device_id, 1))
        transfers = []
        for layer in range(self.layout.num_layers):
            base = layer * num_device_blocks
            for segment, offset, device_id, count in runs:
                device = self.pages[base + device_id : base + device_id + count]
                host = segment.tensor[layer, offset : offset + count]
                transfers.append((host, device) if to_host else (device, host))
        return transfers
