"""The span channel: the executor's step spans to the memory manager over ZeroMQ (DESIGN.md
"Tracing", "Adaptive expansion").

Sending side: :func:`span_channel_tracer` gives a process a tracer whose finished spans a
BatchSpanProcessor hands, on its own thread and in batches, to a :class:`ZmqSpanExporter`, which
sends each batch as one msgspec-encoded :class:`proto.spans.SpanBatch` on a PUSH socket. The step
loop only builds the span; encoding and sending happen off the hot path.

Receiving side: :class:`SpanReceiver` binds a PULL socket and decodes the batches. ``SpanBatch`` is
tagged and array_like like every control message, so an actor may instead register it on its
mailbox (``actor.on(SpanBatch, handler)``) and point the sender at the mailbox's address.

The channel never blocks the sender: while the receiver is absent or slow, batches queue up to a
high-water mark and are dropped beyond it (counted in ``ZmqSpanExporter.num_dropped``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import msgspec
import zmq
from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

import workers
from proto.spans import SpanBatch, SpanRecord
from workers.tracing import process_resource

logger = logging.getLogger(__name__)

__all__ = ["SpanReceiver", "ZmqSpanExporter", "span_channel_tracer", "span_record"]

# The controller acts on each step's spans, so they leave every 20 ms rather than the OTLP default
# of 5 s; a batch is at most a few hundred steps of a fast decode loop.
SCHEDULE_DELAY_MILLIS = 20
MAX_EXPORT_BATCH_SIZE = 256
MAX_QUEUE_SIZE = 8192
SEND_HIGH_WATER_MARK = 256  # batches queued in ZeroMQ for a receiver that is not reading
LINGER_MILLIS = 200  # at shutdown, how long the last batches may take to leave


def span_record(span: ReadableSpan) -> SpanRecord:
    """A finished OpenTelemetry span as it travels on the channel."""
    context = span.context
    assert context is not None and span.start_time is not None and span.end_time is not None
    parent = span.parent
    return SpanRecord(
        name=span.name,
        trace_id=context.trace_id.to_bytes(16, "big"),
        span_id=context.span_id,
        start_time_ns=span.start_time,
        end_time_ns=span.end_time,
        parent_span_id=parent.span_id if parent is not None else 0,
        attributes=dict(span.attributes) if span.attributes else {},
        status=span.status.status_code.value,
        status_message=span.status.description or "",
    )


class ZmqSpanExporter(SpanExporter):
    """Sends span batches to ``address`` (a SpanReceiver or an actor's mailbox).

    NOTE: the socket is created on the first ``export``, so it belongs to the BatchSpanProcessor's
    thread, the only one that exports; ``shutdown`` closes it after that thread has been joined.
    ``context`` must be the receiver's for ``inproc://`` addresses.
    """

    def __init__(self, address: str, context: zmq.Context, service_name: str) -> None:
        self.address = address
        self.context = context
        self.service_name = service_name
        self.pid = os.getpid()
        self.num_dropped = 0  # spans
        self._encoder = msgspec.msgpack.Encoder()
        self._socket: zmq.Socket | None = None
        self._closed = False

    def _open(self) -> zmq.Socket:
        socket = zmq.Socket(self.context, zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
        socket.setsockopt(zmq.LINGER, LINGER_MILLIS)
        socket.connect(self.address)
        self._socket = socket
        return socket

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        batch = SpanBatch(self.service_name, self.pid, [span_record(span) for span in spans])
        try:
            socket = self._socket or self._open()
            socket.send(self._encoder.encode(batch), zmq.NOBLOCK)
        except zmq.Again:
            if not self.num_dropped:
                logger.warning("span channel to %s is full; dropping spans until it drains", self.address)
            self.num_dropped += len(spans)
            return SpanExportResult.FAILURE
        except zmq.ZMQError as error:  # the context was terminated: the process is stopping
            logger.debug("span channel to %s closed: %s", self.address, error)
            self.num_dropped += len(spans)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._closed = True
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here; ZeroMQ sends in the background


def span_channel_tracer(service_name: str, address: str, context: zmq.Context) -> trace.Tracer:
    """A tracer whose spans go to ``address`` over the span channel (and nowhere else). Every span
    is recorded: the receiver's controller needs all of them. Finish with
    ``workers.tracing.shutdown_tracing``."""
    provider = sdk_trace.TracerProvider(
        sampler=ALWAYS_ON, resource=process_resource(service_name), shutdown_on_exit=False
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            ZmqSpanExporter(address, context, service_name),
            max_queue_size=MAX_QUEUE_SIZE,
            schedule_delay_millis=SCHEDULE_DELAY_MILLIS,
            max_export_batch_size=MAX_EXPORT_BATCH_SIZE,
        )
    )
    return provider.get_tracer("pied.spans", workers.__version__)


class SpanReceiver:
    """The receiving end of the span channel: a PULL socket bound at ``address``.

    ``receive(timeout)`` waits for the next batch; ``drain()`` returns every batch already there
    without waiting (what a controller calls once per tick). Batches that do not decode are
    dropped with a warning, so one bad sender cannot stop the receiver. One thread at a time.
    """

    def __init__(self, address: str, context: zmq.Context | None = None) -> None:
        self.address = address
        self._owns_context = context is None
        self.context = context if context is not None else zmq.Context()
        self._decoder = msgspec.msgpack.Decoder(SpanBatch)
        self._socket = zmq.Socket(self.context, zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)

    def decode(self, data: bytes) -> SpanBatch:
        return self._decoder.decode(data)

    def receive(self, timeout: float | None = None) -> SpanBatch | None:
        """The next batch, waiting up to ``timeout`` seconds (None: forever); None on timeout."""
        timeout_ms = None if timeout is None else max(0, int(timeout * 1000))
        while self._socket.poll(timeout_ms):
            batch = self._decode_or_drop(self._socket.recv())
            if batch is not None:
                return batch
        return None

    def drain(self) -> list[SpanBatch]:
        batches = []
        while True:
            try:
                data = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return batches
            batch = self._decode_or_drop(data)
            if batch is not None:
                batches.append(batch)

    def _decode_or_drop(self, data: bytes) -> SpanBatch | None:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as error:
            logger.warning(
                "span receiver %s: dropped an undecodable batch (%d bytes): %s",
                self.address,
                len(data),
                error,
            )
            return None

    def close(self) -> None:
        self._socket.close()
        if self._owns_context:
            self.context.term()

    def __enter__(self) -> SpanReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
