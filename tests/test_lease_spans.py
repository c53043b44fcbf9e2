"""The memory manager's ``lease`` spans (``workers/memory/lease_spans.py``): the expansion
controller's decisions as span events, exported over OTLP/HTTP to a receiver: while the controller
follows a link whose bandwidth drops to a quarter mid-run (the synthetic plant), and from the
daemon's memory-manager process when demand grows the lease."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from server import running_server
from test_tracing import OtlpReceiver, any_value

from proto.config import EngineConfig
from workers.memory.controller import ExpansionController
from workers.memory.lease_spans import (
    DECISION_LEASE,
    DECISION_LINK_BANDWIDTH,
    DECISION_REASON,
    DECISION_STALL_FRACTION,
    DECISION_TARGET,
    LEASE_HOST_BLOCKS,
    LEASE_SPAN,
    LeaseSpans,
)
from workers.memory.simulate import Phase, Plant
from workers.tracing import MEMORY_SERVICE, setup_tracing, shutdown_tracing


class EventReceiver(OtlpReceiver):
    """Also keeps each span's events: (name, time, attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lease_spans: list[dict[str, Any]] = []

    def add(self, path: str, request: ExportTraceServiceRequest) -> None:
        super().add(path, request)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    if span.name != LEASE_SPAN:
                        continue
                    self.lease_spans.append(
                        {
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {a.key: any_value(a.value) for a in span.attributes},
                            "events": [
                                (
                                    event.name,
                                    event.time_unix_nano,
                                    {a.key: any_value(a.value) for a in event.attributes},
                                )
                                for event in span.events
                            ],
                        }
                    )


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_SAMPLER",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.e2e
def test_the_controllers_decisions_are_events_on_the_lease_spans(clean_environment) -> None:
    receiver = EventReceiver()
    try:
        tracer = setup_tracing(
            MEMORY_SERVICE, EngineConfig(otlp_endpoint=f"http://127.0.0.1:{receiver.port}")
        )
        plant = Plant(bandwidth=50e9, report_copy_time=True, phases=(Phase(400, bandwidth_scale=0.25),))
        controller = ExpansionController(4000, 0.02, host_block_bytes=plant.host_block_bytes)
        spans = LeaseSpans(tracer, controller.lease)
        decisions = []
        for _ in range(600):
            step, demand = plant.step(controller.lease)
            decision = controller.observe(step, demand)
            if decision is not None:
                decisions.append(decision)
                spans.decided(decision, controller.stall_fraction, controller.bandwidth)
        spans.close()
        assert shutdown_tracing(tracer)
    finally:
        receiver.close()

    assert {span.service for span in receiver.spans} == {MEMORY_SERVICE}
    leases = sorted(receiver.lease_spans, key=lambda span: span["start"])
    # One span per lease in force, in the order granted: the start, then every move.
    granted = [0]
    for decision in decisions:
        if decision.lease != granted[-1]:
            granted.append(decision.lease)
    assert [span["attributes"][LEASE_HOST_BLOCKS] for span in leases] == granted
    events = [event for span in leases for event in span["events"]]
    assert len(events) == len(decisions)  # every decision, holds too
    assert [event[2][DECISION_REASON] for event in events] == [decision.reason for decision in decisions]
    for span, following in zip(leases, leases[1:]):
        *holds, (action, _, move) = span["events"]
        # A span ends with the move to the next lease; every earlier event held it.
        assert (
            action in ("grow", "shrink", "release")
            and move[DECISION_LEASE] == following["attributes"][LEASE_HOST_BLOCKS]
        )
        assert all(
            name == "hold" and held[DECISION_LEASE] == span["attributes"][LEASE_HOST_BLOCKS]
            for name, _, held in holds
        )
    for span in leases:
        assert all(span["start"] <= when <= span["end"] for _, when, _ in span["events"])
    # The link's drop re-planned at once, from the bandwidth the copy engine measured.
    (replan,) = [event for event in events if event[2][DECISION_REASON].endswith("re-planned")]
    assert replan[0] == "shrink" and replan[2][DECISION_REASON] == "shrink: link bandwidth 0.25x, re-planned"
    assert replan[2][DECISION_LINK_BANDWIDTH] == pytest.approx(12.5e9, rel=0.01)
    assert replan[2][DECISION_TARGET] >= 0 and replan[2][DECISION_STALL_FRACTION] > 0.02


@pytest.mark.e2e
def test_the_daemons_memory_manager_exports_a_lease_span_when_demand_grows_it(
    tiny_model_dir, clean_environment
) -> None:
    clean_environment.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # spans leave every 100 ms
    receiver = EventReceiver()
    flags = ("--kv-policy", "pie", "--device-kv-blocks", "24", "--block-size", "4", "--host-kv-gib", "0.002")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Write a function that adds two numbers, and test it."}],
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": True,
    }
    try:
        endpoint = f"http://127.0.0.1:{receiver.port}"
        model = tiny_model_dir("llama")
        with running_server(
            model, "--served-model-name", "tiny", "--otlp-endpoint", endpoint, *flags
        ) as server:
            # Eight requests at once want more KV than the 24 device blocks: the lease grows, and
            # the span of the empty lease ends with that move.
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(
                    pool.map(lambda _: server.request("POST", "/v1/chat/completions", body), range(8))
                )
            assert all(answer.status == 200 for answer in answers), answers[0].body
            deadline = time.monotonic() + 30
            while not receiver.lease_spans and time.monotonic() < deadline:
                time.sleep(0.05)
            log = server.log()
    finally:
        receiver.close()
    assert receiver.lease_spans, log[-3000:]
    first = min(receiver.lease_spans, key=lambda span: span["start"])
    assert {span.service for span in receiver.spans if span.name == LEASE_SPAN} == {MEMORY_SERVICE}
    assert first["attributes"][LEASE_HOST_BLOCKS] == 0  # adaptive starts empty
    *holds, (action, _, move) = first["events"]
    assert action == "grow" and move[DECISION_LEASE] > 0 and move[DECISION_REASON].startswith("grow")
    assert all(name == "hold" for name, _, _ in holds)
