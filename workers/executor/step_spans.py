"""The executor's spans, built after each step from its timestamps (DESIGN.md "Tracing").

- ``step``: one per step, with the StepResult's timings and transfer counts as attributes
  (``proto.spans`` names them), and one ``layer`` child per layer on the steps sampled by
  ``--trace-layers-every N`` (step ids divisible by N) when the runner times its layers. A layer's
  own children show the pipeline: ``host load`` (the copy engine loading its host pages, usually
  during earlier layers), ``wait`` (compute waiting for that load: the stall), ``compute`` (the
  layer's time on the compute thread outside the wait) and ``write-back`` (the copy engine writing
  its new K/V to host), so one trace shows whether copies hide under compute and which layer
  stalls. Their times are readings the runner took anyway (no sync added on the hot path). Sent every
  step on the span channel to the memory manager, whose controller reads them; exported over OTLP
  only when sampled, as a root span linked to the requests it prefilled: every decode step in OTLP
  would be one more trace per step and would drown the request traces.
- ``execute``: one per sampled request whose prompt the step computed (a prefill chunk), in that
  request's trace as a child of the scheduler's ``prefill`` span (its traceparent came in
  ``NewRequestData.trace_context``). Exported over OTLP.

Nothing here runs during the forward pass: the actor times the step on the compute thread
(:class:`StepTiming`) and calls :meth:`StepSpans.end` after the result has been sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Status, StatusCode

import proto
from proto.spans import (
    LAYER_INDEX,
    LAYER_SPAN,
    LAYER_STALL_TIME,
    STEP_BYTES_TO_DEVICE,
    STEP_BYTES_TO_HOST,
    STEP_COPY_TIME,
    STEP_ERROR,
    STEP_FORWARD_TIME,
    STEP_ID,
    STEP_LAYER_COMPUTE_TIME,
    STEP_LAYERS_TRACED,
    STEP_LINK_BANDWIDTH,
    STEP_NUM_HOST_BLOCKS,
    STEP_NUM_REQUESTS,
    STEP_NUM_TOKENS,
    STEP_RANK,
    STEP_SPAN,
    STEP_STALL_TIME,
)
from workers.tracing import sampled_parent, tracing_enabled

logger = logging.getLogger(__name__)

EXECUTE_SPAN = "execute"
# A traced layer's children (see the module doc).
LOAD_SPAN = "host load"
WAIT_SPAN = "wait"
COMPUTE_SPAN = "compute"
WRITE_BACK_SPAN = "write-back"


class LayerTime(NamedTuple):
    """One layer of a traced step. Times are ``time.perf_counter_ns()`` readings (the CPU copy
    thread's are on the same clock; CUDA event times are placed on it after the step), 0 where the
    runner took none: ``start``/``end`` of the layer on the compute thread, ``stall`` seconds it
    waited for its host pages, that wait, the copy engine's load of the layer's host pages, and its
    write-back of the layer's new K/V. ``(start, end, stall)`` alone is a layer without streaming."""

    start: int
    end: int
    stall: float = 0.0
    wait_start: int = 0
    wait_end: int = 0
    load_start: int = 0
    load_end: int = 0
    write_back_start: int = 0
    write_back_end: int = 0

    def phases(self) -> list[tuple[str, int, int]]:
        """(child span name, start, end) of what the layer recorded, in start order: compute is
        the layer's span less its wait (before the wait: the projections; after: attention on)."""
        phases = []
        if self.load_end > self.load_start > 0:
            phases.append((LOAD_SPAN, self.load_start, self.load_end))
        if self.start <= self.wait_start < self.wait_end <= self.end:
            if self.wait_start > self.start:
                phases.append((COMPUTE_SPAN, self.start, self.wait_start))
            phases.append((WAIT_SPAN, self.wait_start, self.wait_end))
            if self.end > self.wait_end:
                phases.append((COMPUTE_SPAN, self.wait_end, self.end))
        elif self.end > self.start and self.wait_start > 0:
            phases.append((COMPUTE_SPAN, self.start, self.end))  # the load was there in time
        if self.write_back_end > self.write_back_start > 0:
            phases.append((WRITE_BACK_SPAN, self.write_back_start, self.write_back_end))
        return sorted(phases, key=lambda phase: phase[1])


@dataclass
class StepTiming:
    """When a step ran, taken on the compute thread around ``runner.execute``: wall-clock
    nanoseconds since the epoch, and the ``perf_counter_ns`` reading at ``start_ns`` that places
    the runner's layer times on the same clock."""

    start_ns: int
    end_ns: int
    perf_start_ns: int
    layer_times: list[LayerTime] | None = None

    def wall_ns(self, perf_ns: int) -> int:
        return self.start_ns + (perf_ns - self.perf_start_ns)


class StepSpans:
    """Builds the executor's spans. ``tracer`` exports over OTLP (a no-op tracer without an
    endpoint); ``channel`` sends to the memory manager (None until one listens).
    ``trace_layers_every``: every N-th step is timed layer by layer and exported over OTLP too
    (0: never)."""

    def __init__(
        self, tracer: trace.Tracer, channel: trace.Tracer | None, trace_layers_every: int, rank: int | None = None
    ) -> None:
        """``rank``: the tensor-parallel rank each step span is labelled with (None: one rank)."""
        self.tracer = tracer
        self.rank = rank
        self.channel = channel
        self.trace_layers_every = trace_layers_every
        self._exports = tracing_enabled(tracer)  # over OTLP
        # Requests whose prompt is being computed, until their first sampled token: the parent of
        # their ``execute`` spans (the scheduler's prefill span).
        self._prefilling: dict[str, Context] = {}
        self._warned_no_layer_times = False

    def samples_layers(self, plan: proto.StepPlan) -> bool:
        """Whether this step is one whose layers are traced (and which goes to OTLP)."""
        return self.trace_layers_every > 0 and plan.step_id % self.trace_layers_every == 0

    def begin(self, plan: proto.StepPlan) -> None:
        """Before the step: learn the traced requests it starts, forget the finished ones."""
        for request_id in plan.finished_request_ids:
            self._prefilling.pop(request_id, None)
        if not self._exports:
            return
        for new in plan.new_requests:
            parent = sampled_parent(new.trace_context)
            if parent is not None:
                self._prefilling[new.request_id] = parent

    def end(self, plan: proto.StepPlan, result: proto.StepResult, timing: StepTiming) -> None:
        """After the step: build its spans."""
        links: list[Link] = []
        if self._prefilling:
            links = self._execute_spans(plan, result, timing)
        sampled = self.samples_layers(plan)
        if sampled and timing.layer_times is None and not self._warned_no_layer_times:
            self._warned_no_layer_times = True
            logger.warning("the model runner does not time its layers; sampled steps are traced without them")
        if self.channel is not None:
            self._step_span(self.channel, plan, result, timing, [])
        if sampled and self._exports:
            self._step_span(self.tracer, plan, result, timing, links)

    def _step_span(
        self,
        tracer: trace.Tracer,
        plan: proto.StepPlan,
        result: proto.StepResult,
        timing: StepTiming,
        links: list[Link],
    ) -> None:
        layer_times = timing.layer_times
        attributes = {
            STEP_ID: plan.step_id,
            STEP_NUM_REQUESTS: len(plan.request_ids),
            STEP_NUM_TOKENS: len(plan.token_ids) // 4,
            STEP_NUM_HOST_BLOCKS: result.num_host_blocks,
            STEP_BYTES_TO_DEVICE: result.bytes_to_device,
            STEP_BYTES_TO_HOST: result.bytes_to_host,
            STEP_STALL_TIME: result.stall_time,
            STEP_FORWARD_TIME: result.forward_time,
            STEP_LAYER_COMPUTE_TIME: result.layer_compute_time,
            STEP_COPY_TIME: result.copy_time,
            STEP_LINK_BANDWIDTH: result.link_bandwidth,
            STEP_LAYERS_TRACED: layer_times is not None,
        }
        if self.rank is not None:
            attributes[STEP_RANK] = self.rank
        if result.error:
            attributes[STEP_ERROR] = result.error
        span = tracer.start_span(STEP_SPAN, start_time=timing.start_ns, attributes=attributes, links=links)
        if result.error:
            span.set_status(Status(StatusCode.ERROR, result.error))
        if layer_times is not None:
            step_context = trace.set_span_in_context(span)
            for index, times in enumerate(layer_times):
                times = LayerTime(*times)
                layer = tracer.start_span(
                    LAYER_SPAN,
                    context=step_context,
                    start_time=timing.wall_ns(times.start),
                    attributes={LAYER_INDEX: index, LAYER_STALL_TIME: times.stall},
                )
                layer_context = trace.set_span_in_context(layer)
                for name, start, end in times.phases():
                    phase = tracer.start_span(
                        name,
                        context=layer_context,
                        start_time=timing.wall_ns(start),
                        attributes={LAYER_INDEX: index},
                    )
                    phase.end(end_time=timing.wall_ns(end))
                layer.end(end_time=timing.wall_ns(times.end))
        span.end(end_time=timing.end_ns)

    def _execute_spans(
        self, plan: proto.StepPlan, result: proto.StepResult, timing: StepTiming
    ) -> list[Link]:
        """One ``execute`` span per traced request this step computed prompt tokens for; returns
        links to them for the step span. A request leaves ``_prefilling`` with its first token."""
        prefilling = self._prefilling
        num_scheduled_tokens = proto.unpack_i32(plan.num_scheduled_tokens)
        start_positions = proto.unpack_i32(plan.start_positions)
        sample = np.frombuffer(plan.sample, dtype=np.uint8)
        links = []
        for index, request_id in enumerate(plan.request_ids):
            parent = prefilling.get(request_id)
            if parent is None:
                continue
            attributes = {
                "pied.request.id": request_id,
                "pied.request.num_scheduled_tokens": int(num_scheduled_tokens[index]),
                "pied.request.num_computed_tokens": int(start_positions[index]),
                STEP_ID: plan.step_id,
                STEP_NUM_REQUESTS: len(plan.request_ids),
                STEP_FORWARD_TIME: result.forward_time,
                STEP_STALL_TIME: result.stall_time,
            }
            span = self.tracer.start_span(
                EXECUTE_SPAN, context=parent, start_time=timing.start_ns, attributes=attributes
            )
            if result.error:
                span.set_status(Status(StatusCode.ERROR, result.error))
            span.end(end_time=timing.end_ns)
            links.append(Link(span.get_span_context()))
            if sample[index]:
                del prefilling[request_id]  # its prompt is done: the next steps decode
        return links
