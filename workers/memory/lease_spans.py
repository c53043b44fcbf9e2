"""The memory manager's spans: the expansion controller's decisions in a trace (DESIGN.md "Tracing").

One ``lease`` span per lease in force: it starts when the lease is granted and ends when a decision
moves it (or the manager stops). Every decision taken meanwhile is an event on it, named after its
action (``hold``, ``grow``, ``shrink``, ``release``), with the reason, the lease decided, the
controller's target, the stall fraction it measured and its bandwidth estimate; the move that ends
a span is its last event. In Jaeger an operator sees how long each lease held and why it moved
(a re-plan after a change of the workload or the link says so in its reason).

Exported over OTLP only (``--otlp-endpoint``); without one the manager builds none of it.
"""

from __future__ import annotations

from opentelemetry import trace

from workers.memory.controller import Decision

LEASE_SPAN = "lease"
LEASE_HOST_BLOCKS = "pied.lease.host_blocks"  # the lease in force during the span
DECISION_REASON = "pied.decision.reason"
DECISION_LEASE = "pied.decision.lease"
DECISION_TARGET = "pied.decision.target"  # the controller's estimate of the largest transparent lease
DECISION_STALL_FRACTION = "pied.decision.stall_fraction"  # measured at the lease in force
DECISION_LINK_BANDWIDTH = "pied.decision.link_bandwidth"  # bytes/s, 0: unknown


class LeaseSpans:
    """Builds the ``lease`` spans on ``tracer`` from the controller's decisions, starting with
    ``lease`` in force."""

    def __init__(self, tracer: trace.Tracer, lease: int) -> None:
        self.tracer = tracer
        self.lease = lease
        self._span = self._start(lease)

    def _start(self, lease: int) -> trace.Span:
        return self.tracer.start_span(LEASE_SPAN, attributes={LEASE_HOST_BLOCKS: lease})

    def decided(self, decision: Decision, stall_fraction: float, link_bandwidth: float | None) -> None:
        """One decision: an event on the span of the lease in force; a move ends it."""
        self._span.add_event(
            decision.action,
            attributes={
                DECISION_REASON: decision.reason,
                DECISION_LEASE: decision.lease,
                DECISION_TARGET: decision.target,
                DECISION_STALL_FRACTION: stall_fraction,
                DECISION_LINK_BANDWIDTH: link_bandwidth or 0.0,
            },
        )
        if decision.lease != self.lease:
            self._span.end()
            self.lease = decision.lease
            self._span = self._start(decision.lease)

    def close(self) -> None:
        """End the span of the lease in force (at shutdown)."""
        self._span.end()
