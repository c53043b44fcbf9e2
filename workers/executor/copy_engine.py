"""The copy engine: batches of host <-> device transfers run in submission order, off the compute path.

On CUDA a dedicated copy stream ordered against the compute stream by events (host segments are
pinned, copies are ``non_blocking``); on CPU a copy thread (torch copies release the GIL)
signalling events. ``LayerStreamer`` (streaming.py) and ``HostKV`` (host_kv.py) submit to it.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

Transfer = tuple[torch.Tensor, torch.Tensor]  # (destination, source), same shape, both contiguous
# A kernel launch that moves pages itself (the host-page kernel, triton_host_pages.py), run in the
# batch's place in the FIFO: on the copy stream on CUDA, on the copy thread on CPU.
Launch = Callable[[], None]
Work = Transfer | Launch


def run_work(work: Work, non_blocking: bool) -> None:
    if callable(work):
        work()
    else:
        destination, source = work
        destination.copy_(source, non_blocking=non_blocking)


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
    def submit(self, transfers: list[Work], num_bytes: int) -> CopyTicket:
        """Queue ``transfers`` (copies or launches) to run, in order, after every earlier batch and after all compute
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
    def __init__(self, transfers: list[Work], num_bytes: int) -> None:
        super().__init__(num_bytes)
        self.transfers = transfers
        self.done = threading.Event()
        self.busy = 0.0  # written by the copy thread before ``done`` is set
        # perf_counter_ns when the copy thread began and finished the batch (for layer spans).
        self.started_ns = 0
        self.finished_ns = 0
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
            ticket.started_ns = time.perf_counter_ns()
            if self.error is None:  # after a failure, batches are only marked done
                try:
                    for work in ticket.transfers:
                        run_work(work, non_blocking=False)
                except BaseException as error:  # noqa: BLE001 - reported to compute by wait/synchronize
                    self.error = error
                throttle = self.throttle_bytes_per_s
                if throttle:
                    remaining = ticket.num_bytes / throttle - (time.perf_counter() - start)
                    time.sleep(max(0.0, remaining))
            ticket.busy = time.perf_counter() - start
            ticket.finished_ns = time.perf_counter_ns()
            ticket.transfers = []  # drop the views: a detached segment must not stay mapped through them
            # NOTE: set after the copies: a waiter that sees ``done`` sees the copied pages.
            ticket.done.set()


class ThreadCopyEngine(CopyEngine):
    """CPU: one copy thread works through a FIFO of batches. ``throttle_bytes_per_s`` (tests only)
    caps its bandwidth by sleeping after each batch, to create stalls on purpose."""

    def __init__(self, throttle_bytes_per_s: float | None = None) -> None:
        self._worker = _CopyWorker(throttle_bytes_per_s)
        self._last: _ThreadTicket | None = None
        self._thread = threading.Thread(target=self._worker.run, name="pied-copy", daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, self._worker.queue.put, None)

    def set_throttle(self, bytes_per_s: float | None) -> None:
        """Tests only: a new cap (None: none) from the next batch the copy thread starts (a prefetch
        queued under the old cap keeps it)."""
        self._worker.throttle_bytes_per_s = bytes_per_s  # NOTE: one attribute, read once per batch

    def submit(self, transfers: list[Work], num_bytes: int) -> CopyTicket:
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

    def submit(self, transfers: list[Work], num_bytes: int) -> CopyTicket:
        ticket = _CudaTicket(num_bytes)
        # NOTE: the copy stream waits for everything the compute stream has been given so far (the
        # staging area's last reader, the new K/V to write back), then copies in stream order.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            ticket.start.record(self.stream)
            for work in transfers:
                run_work(work, non_blocking=True)
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
