"""Spans shipped between pied's processes over ZeroMQ (DESIGN.md "Tracing", "Adaptive expansion").

The executor records each step as an OpenTelemetry span and ships it, batched, to the memory
manager, whose expansion controller reads the step's timings from the span's attributes. The span
names and attribute keys below are that contract: the executor writes them, consumers read them.

Times are nanoseconds since the epoch (OpenTelemetry's clock); durations inside attributes are
seconds (float); byte counts are ints.
"""

from __future__ import annotations

from typing import Union

import msgspec

__all__ = [
    "SpanRecord",
    "SpanBatch",
    "AttributeValue",
    "STEP_SPAN",
    "LAYER_SPAN",
    "STEP_ID",
    "STEP_RANK",
    "STEP_NUM_REQUESTS",
    "STEP_NUM_TOKENS",
    "STEP_NUM_HOST_BLOCKS",
    "STEP_BYTES_TO_DEVICE",
    "STEP_BYTES_TO_HOST",
    "STEP_STALL_TIME",
    "STEP_FORWARD_TIME",
    "STEP_LAYER_COMPUTE_TIME",
    "STEP_LAYERS_TRACED",
    "STEP_ERROR",
    "LAYER_INDEX",
    "LAYER_STALL_TIME",
]

# ---------------------------------------------------------------- names the executor writes

STEP_SPAN = "step"  # one forward pass: from the plan's arrival on the compute thread to its result
LAYER_SPAN = "layer"  # one layer of a step whose layers were traced (a child of its step span)

STEP_ID = "pied.step.id"
STEP_RANK = "pied.step.rank"  # the executor's tensor-parallel rank (only with more than one rank)
STEP_NUM_REQUESTS = "pied.step.num_requests"  # batch size: requests scheduled in the step
STEP_NUM_TOKENS = "pied.step.num_tokens"  # tokens computed: prefill chunks plus one per decode
STEP_NUM_HOST_BLOCKS = "pied.step.num_host_blocks"  # distinct host blocks the step streamed
STEP_BYTES_TO_DEVICE = "pied.step.bytes_to_device"
STEP_BYTES_TO_HOST = "pied.step.bytes_to_host"
STEP_STALL_TIME = "pied.step.stall_time"  # seconds compute waited for the copy engine
STEP_FORWARD_TIME = "pied.step.forward_time"  # seconds of the forward pass (the span also covers
# the plan's inputs, swaps and sampling)
STEP_LAYER_COMPUTE_TIME = "pied.step.layer_compute_time"  # mean seconds of compute per layer
STEP_COPY_TIME = "pied.step.copy_time"  # seconds the copy engine was busy with the step's transfers
STEP_LINK_BANDWIDTH = "pied.step.link_bandwidth"  # host -> device bytes/s measured at start (prior)
STEP_LAYERS_TRACED = "pied.step.layers_traced"  # True on sampled steps (they have layer children)
STEP_ERROR = "pied.step.error"  # the executor's error text when the step failed

LAYER_INDEX = "pied.layer.index"
LAYER_STALL_TIME = "pied.layer.stall_time"  # seconds this layer waited for its host pages

# ---------------------------------------------------------------- wire format

Scalar = Union[bool, int, float, str]
AttributeValue = Union[bool, int, float, str, list[Scalar]]


class SpanRecord(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One finished span.

    ``trace_id`` is the 16-byte trace id (big-endian, as in the W3C traceparent); ``span_id`` and
    ``parent_span_id`` are the 64-bit ids (``parent_span_id`` 0: a root span).
    ``start_time_ns <= end_time_ns``. ``status`` is OpenTelemetry's StatusCode value (0 unset,
    1 ok, 2 error) and ``status_message`` its description.
    """

    name: str
    trace_id: bytes
    span_id: int
    start_time_ns: int
    end_time_ns: int
    parent_span_id: int = 0
    attributes: dict[str, AttributeValue] = {}
    status: int = 0
    status_message: str = ""


class SpanBatch(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """Spans one process finished since its previous batch, oldest first. ``service`` is the
    sender's OpenTelemetry service name (``pied-executor``) and ``pid`` its process id. Tagged and
    array_like like the control messages, so an actor can take it on its mailbox."""

    service: str
    pid: int
    spans: list[SpanRecord]
