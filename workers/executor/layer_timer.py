"""Per-layer timestamps of one sampled step, for its ``layer`` spans (``--trace-layers-every``,
:mod:`workers.executor.step_spans`).

The runner times a step layer by layer only when the step is sampled: it hooks each decoder layer
for the step (forward pre/post hooks, removed after it, so other steps pay nothing) and hands the
timer to the step's ``LayerStreamer``, which reports around each wait for a layer's host pages and
each layer's write-back batch. What it records:

- CPU: ``time.perf_counter_ns()`` at layer boundaries and around each wait, on the compute thread;
  the copy thread stamps each batch's start and end on the same clock.
- CUDA: events recorded on the compute stream at layer boundaries (the copy engine's batches have
  their own start/end events, and each wait an arrival event), read once the step's one host sync
  has run, never a sync per layer; placed on the ``perf_counter_ns`` clock through a reference
  event recorded with a clock reading at the start of the step (approximate: launch vs run time).

:meth:`LayerTimer.finish` gives one :class:`LayerTime` per layer: start, end, stall seconds, the
wait, the load of the layer's host pages, and its write-back (0 where there was none).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from workers.executor.copy_engine import CopyEngine, CopyTicket
from workers.executor.step_spans import LayerTime


@dataclass
class _Layer:
    """What one layer recorded; marks are ints (CPU, ns) or CUDA events."""

    start: object = None
    end: object = None
    wait_start: object = None
    wait_end: object = None
    stall: float = 0.0
    wait_ticket: CopyTicket | None = None
    load: CopyTicket | None = None
    write_back: CopyTicket | None = None


class LayerTimer(ABC):
    """Records one step's layers; ``attach`` before the forward pass, ``finish`` after its sync."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = [_Layer() for _ in layers]
        self._modules = layers
        self._hooks: list = []

    @staticmethod
    def create(layers: nn.ModuleList, device: torch.device) -> LayerTimer:
        return CudaLayerTimer(layers, device) if device.type == "cuda" else CpuLayerTimer(layers)

    def attach(self) -> None:
        """Hook every layer for this step."""
        for index, module in enumerate(self._modules):
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook(index)))
            self._hooks.append(module.register_forward_hook(self._post_hook(index)))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _pre_hook(self, index: int):
        def hook(*_) -> None:
            self.layers[index].start = self.mark()

        return hook

    def _post_hook(self, index: int):
        def hook(*_) -> None:
            self.layers[index].end = self.mark()

        return hook

    @abstractmethod
    def mark(self) -> object:
        """A timestamp on the compute path, read in ``finish``."""

    @abstractmethod
    def wait(self, layer: int, ticket: CopyTicket, engine: CopyEngine) -> None:
        """``engine.wait(ticket)`` for ``layer``'s host pages, timed."""

    def loaded(self, layer: int, ticket: CopyTicket) -> None:
        """The batch that loaded ``layer``'s host pages (the one its wait was on)."""
        self.layers[layer].load = ticket

    def wrote_back(self, layer: int, ticket: CopyTicket) -> None:
        """The batch that writes ``layer``'s new K/V back to host."""
        self.layers[layer].write_back = ticket

    @abstractmethod
    def finish(self) -> list[LayerTime]:
        """After the step's sync (and its write-backs): every layer's times."""


class CpuLayerTimer(LayerTimer):
    def mark(self) -> int:
        return time.perf_counter_ns()

    def wait(self, layer: int, ticket: CopyTicket, engine: CopyEngine) -> None:
        record = self.layers[layer]
        before = ticket.stall_time()
        start = time.perf_counter_ns()
        engine.wait(ticket)
        end = time.perf_counter_ns()
        record.stall = ticket.stall_time() - before
        # A load that was there in time shows no wait span (zero length).
        record.wait_start, record.wait_end = (start, end) if record.stall > 0 else (start, start)
        record.load = ticket

    def finish(self) -> list[LayerTime]:
        self.detach()
        times = []
        for record in self.layers:
            load = _copy_times(record.load)
            write_back = _copy_times(record.write_back)
            times.append(
                LayerTime(
                    record.start or 0,
                    record.end or 0,
                    record.stall,
                    record.wait_start or 0,
                    record.wait_end or 0,
                    *load,
                    *write_back,
                )
            )
        return times


def _copy_times(ticket: CopyTicket | None) -> tuple[int, int]:
    """The copy thread's (start, end) ``perf_counter_ns`` stamps of a batch (0, 0: none)."""
    if ticket is None:
        return 0, 0
    return ticket.started_ns, ticket.finished_ns  # type: ignore[attr-defined]


class CudaLayerTimer(LayerTimer):
    def __init__(self, layers: nn.ModuleList, device: torch.device) -> None:
        super().__init__(layers)
        self.device = device
        self._reference = torch.cuda.Event(enable_timing=True)
        self._reference.record(torch.cuda.current_stream(device))
        self._reference_ns = time.perf_counter_ns()

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, layer: int, ticket: CopyTicket, engine: CopyEngine) -> None:
        engine.wait(ticket)  # records the compute stream's arrival on the ticket; nothing syncs
        record = self.layers[layer]
        record.wait_ticket = ticket
        record.load = ticket

    def _ns(self, event: object) -> int:
        if not isinstance(event, torch.cuda.Event):
            return 0
        return self._reference_ns + round(self._reference.elapsed_time(event) * 1e6)

    def finish(self) -> list[LayerTime]:
        self.detach()
        last = self.layers[-1].end if self.layers else None
        if isinstance(last, torch.cuda.Event):
            last.synchronize()  # done already after the step's host sync; a step that sampled nothing has none
        times = []
        for record in self.layers:
            stall, wait_start, wait_end = 0.0, 0, 0
            ticket = record.wait_ticket
            if ticket is not None:
                arrival = ticket.arrival  # type: ignore[attr-defined]
                stall = ticket.stall_time()
                wait_start = self._ns(arrival)
                wait_end = wait_start + round(stall * 1e9)
            load = (self._ns(record.load.start), self._ns(record.load.end)) if record.load else (0, 0)  # type: ignore[attr-defined]
            write_back = (
                (self._ns(record.write_back.start), self._ns(record.write_back.end))  # type: ignore[attr-defined]
                if record.write_back
                else (0, 0)
            )
            times.append(
                LayerTime(self._ns(record.start), self._ns(record.end), stall, wait_start, wait_end, *load, *write_back)
            )
        return times
