"""Each request's life on the scheduler as spans: ``queue``, ``prefill``, ``decode`` (DESIGN.md "Tracing").

The step loop only records timestamps (arrival, first scheduled, first token, finish); the spans are
built when the request finishes, with explicit start and end times, as children of the request's
span in the API (the ``traceparent`` in ``AddRequest.trace_context``)::

    POST /v1/chat/completions          (pied)
    ├── queue                          arrival -> first scheduled
    ├── prefill                        first scheduled -> first token
    │   └── execute ...                (pied-executor: the forward passes over the prompt)
    └── decode                         first token -> finish

The ``prefill`` span's id is reserved when the prefill starts and sent to the executor in
``NewRequestData.trace_context``, so the executor's spans can name it as their parent before it
exists (:class:`workers.tracing.PresetSpanIds`). Only requests whose trace is sampled are tracked.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanContext, Status, StatusCode

from proto import AddRequest, FinishReason, StepPlan, TokenDelta
from workers.scheduler.request import Request, RequestStatus
from workers.tracing import PresetSpanIds, sampled_parent, traceparent

QUEUE_SPAN = "queue"
PREFILL_SPAN = "prefill"
DECODE_SPAN = "decode"


class RequestLife:
    """Timestamps (ns since the epoch) of one traced request; 0 until the event happens."""

    __slots__ = (
        "request_id",
        "parent",
        "parent_span_context",
        "num_prompt_tokens",
        "request",
        "arrival_ns",
        "scheduled_ns",
        "first_token_ns",
        "prefill_span_id",
        "num_preemptions",
    )

    def __init__(self, message: AddRequest, parent: Context, request: Request | None) -> None:
        self.request_id = message.request_id
        self.parent = parent
        self.parent_span_context = trace.get_current_span(parent).get_span_context()
        self.num_prompt_tokens = len(message.prompt_token_ids) // 4
        self.request = request  # the scheduler's, read-only here; None if it was rejected
        self.arrival_ns = int(message.arrival_time * 1e9) if message.arrival_time else time.time_ns()
        self.scheduled_ns = 0
        self.first_token_ns = 0
        self.prefill_span_id = 0
        self.num_preemptions = 0


class RequestSpans:
    """Builds the scheduler's spans of every sampled request. Driven by the scheduler actor at
    points of its cycle: :meth:`arrived` (a request was added), :meth:`scheduled` (a plan was made,
    before it is sent), :meth:`stepped` (a step's deltas came out) and :meth:`finished` (deltas of
    aborted or rejected requests between steps)."""

    def __init__(self, tracer: trace.Tracer, span_ids: PresetSpanIds) -> None:
        self.tracer = tracer
        self.span_ids = span_ids
        self._lives: dict[str, RequestLife] = {}
        self._prefilling: dict[str, RequestLife] = {}  # scheduled, no token yet
        self._running: dict[str, RequestLife] = {}  # scheduled and not preempted since
        self._preempted: dict[str, RequestLife] = {}
        self._num_preemptions = 0  # the scheduler's count when last looked at

    @property
    def num_tracked(self) -> int:
        return len(self._lives)

    def arrived(self, message: AddRequest, request: Request | None) -> None:
        parent = sampled_parent(message.trace_context)
        if parent is not None:
            self._lives[message.request_id] = RequestLife(message, parent, request)

    def scheduled(self, plan: StepPlan, num_preemptions: int, now_ns: int) -> None:
        """Note the requests this plan schedules for the first time (their prefill starts) and give
        the executor their prefill span as parent; count the preemptions ``schedule()`` made."""
        lives = self._lives
        for new in plan.new_requests:
            life = lives.get(new.request_id)
            if life is None:
                continue
            life.scheduled_ns = now_ns
            life.prefill_span_id = self.span_ids.reserve()
            parent = life.parent_span_context
            new.trace_context = traceparent(
                SpanContext(parent.trace_id, life.prefill_span_id, False, parent.trace_flags)
            )
            self._prefilling[life.request_id] = life
            self._running[life.request_id] = life
        if self._preempted:
            for request_id, life in list(self._preempted.items()):
                if life.request is not None and life.request.status == RequestStatus.RUNNING:
                    del self._preempted[request_id]
                    self._running[request_id] = life
        if num_preemptions != self._num_preemptions:
            # Only after a step that preempted: find which of ours lost their place.
            self._num_preemptions = num_preemptions
            for request_id, life in list(self._running.items()):
                if life.request is not None and life.request.status != RequestStatus.RUNNING:
                    life.num_preemptions += 1
                    del self._running[request_id]
                    self._preempted[request_id] = life

    def stepped(self, deltas: Iterable[TokenDelta], now_ns: int) -> None:
        """After a step: note first tokens, and end the requests whose final delta this is."""
        if self._prefilling:
            for request_id, life in list(self._prefilling.items()):
                request = life.request
                if request is not None and request.num_output_tokens:
                    life.first_token_ns = now_ns
                    del self._prefilling[request_id]
        self.finished(deltas, now_ns)

    def finished(self, deltas: Iterable[TokenDelta], now_ns: int) -> None:
        """End the tracked requests whose final delta is among ``deltas`` (aborts, rejections)."""
        lives = self._lives
        for delta in deltas:
            if delta.finish_reason is not None and delta.request_id in lives:
                self._end(lives.pop(delta.request_id), delta, now_ns)

    def _end(self, life: RequestLife, delta: TokenDelta, now_ns: int) -> None:
        request_id = life.request_id
        self._prefilling.pop(request_id, None)
        self._running.pop(request_id, None)
        self._preempted.pop(request_id, None)
        reason = FinishReason(delta.finish_reason)
        # pied.* rather than gen_ai.usage.*: the API span carries the request's usage, and GenAI
        # dashboards that sum usage over spans must not count it twice.
        common = {"pied.request.id": request_id, "pied.request.num_prompt_tokens": life.num_prompt_tokens}
        num_output_tokens = life.request.num_output_tokens if life.request is not None else 0
        outcome = {
            "pied.request.finish_reason": str(reason),
            "pied.request.num_preemptions": life.num_preemptions,
            "pied.request.num_output_tokens": num_output_tokens,
        }
        error = (delta.error or "the engine failed the request") if reason == FinishReason.ERROR else ""
        phases = [(QUEUE_SPAN, life.arrival_ns, life.scheduled_ns or now_ns)]
        if life.scheduled_ns:
            phases.append((PREFILL_SPAN, life.scheduled_ns, life.first_token_ns or now_ns))
        if life.first_token_ns and life.first_token_ns < now_ns:  # else it ended with its first token
            phases.append((DECODE_SPAN, life.first_token_ns, now_ns))
        for name, start_ns, end_ns in phases:
            last = name == phases[-1][0]  # the phase the request ended in: it gets the outcome
            if name == PREFILL_SPAN:
                self.span_ids.use_next(life.prefill_span_id)
            span = self.tracer.start_span(
                name,
                context=life.parent,
                start_time=start_ns,
                attributes=(common | outcome) if last else common,
            )
            if last and error:
                span.set_status(Status(StatusCode.ERROR, error))
            span.end(end_time=max(end_ns, start_ns))
