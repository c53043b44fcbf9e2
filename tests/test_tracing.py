"""OpenTelemetry across pied's processes (DESIGN.md "Tracing").

- one request is one trace: ``pied serve --otlp-endpoint`` exports, from the API, the scheduler and
  the executor processes, spans that an OTLP/HTTP receiver on 127.0.0.1 finds under the trace id
  of the request's ``traceparent`` header, parented correctly and with the GenAI attributes;
- without an endpoint nothing is exported and no exporter thread is started;
- the endpoint and protocol come from the flag or the standard variables;
- the scheduler's queue/prefill/decode spans and the executor's step/execute/layer spans, built
  after the fact from timestamps;
- the span channel to the memory manager: msgspec over ZeroMQ, inproc and ipc.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import http.server
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import StatusCode
from server import running_server
from step_span_checks import check_step_layers, run_executor_steps

import proto
import proto.spans as span_names
from proto.config import ConfigError, EngineConfig
from proto.spans import SpanBatch, SpanRecord
from workers.actor import Addresses
from workers.executor.step_spans import EXECUTE_SPAN, StepSpans, StepTiming
from workers.memory.actor import step_sample_from_span
from workers.memory.spans import SpanReceiver, span_channel_tracer, span_record
from workers.scheduler.request_spans import DECODE_SPAN, PREFILL_SPAN, QUEUE_SPAN, RequestSpans
from workers.scheduler.scheduler import Scheduler
from workers.tracing import (
    GRPC,
    HTTP_PROTOBUF,
    OtlpTarget,
    PresetSpanIds,
    otlp_target,
    parent_context,
    setup_tracing,
    shutdown_tracing,
    traceparent,
    tracing_enabled,
)

OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)
# The caller's span, as a client would send it: trace 0af7..., span b7ad..., sampled.
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"


@pytest.fixture
def clean_otel_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def otel_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("OtelBatch")]


# ---------------------------------------------------------------- an OTLP/HTTP receiver


@dataclass
class ReceivedSpan:
    service: str
    pid: int
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_time_ns: int
    end_time_ns: int
    status_code: int
    attributes: dict[str, Any] = field(default_factory=dict)


def any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind is not None else None


class SpanStore:
    """The spans of every ``ExportTraceServiceRequest`` received, flattened, with their resource's
    service name and pid."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.paths: set[str] = set()
        self._lock = threading.Lock()

    def add(self, path: str, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {
                attribute.key: any_value(attribute.value) for attribute in resource_spans.resource.attributes
            }
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            service=resource["service.name"],
                            pid=resource["process.pid"],
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_time_ns=span.start_time_unix_nano,
                            end_time_ns=span.end_time_unix_nano,
                            status_code=span.status.code,
                            attributes={a.key: any_value(a.value) for a in span.attributes},
                        )
                    )
        with self._lock:
            self.paths.add(path)
            self.spans += found

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]


class OtlpReceiver(SpanStore):
    """Answers ``POST /v1/traces`` on 127.0.0.1 like a collector."""

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.add(self.path, ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp_receiver():
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


# ---------------------------------------------------------------- one request, one trace


def test_one_request_is_one_trace_across_processes(tiny_model_dir, otlp_receiver, clean_otel_environment):
    # Spans leave every 100 ms instead of every 5 s, so the test need not stop the server to see them.
    clean_otel_environment.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    model = tiny_model_dir("llama")
    endpoint = f"http://127.0.0.1:{otlp_receiver.port}"
    with running_server(model, "--served-model-name", "tiny", "--otlp-endpoint", endpoint) as server:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
            "max_tokens": 6,
            "temperature": 0,
            "top_p": 0.9,
            "ignore_eos": True,
        }
        response = server.request("POST", "/v1/chat/completions", body, headers={"traceparent": TRACEPARENT})
        assert response.status == 200, response.body
        answer = response.json()
        wanted = {"POST /v1/chat/completions", QUEUE_SPAN, PREFILL_SPAN, DECODE_SPAN, EXECUTE_SPAN}
        deadline = time.monotonic() + 20
        while (
            not wanted <= {span.name for span in otlp_receiver.trace(TRACE_ID)}
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        spans = otlp_receiver.trace(TRACE_ID)
        assert otlp_receiver.paths == {"/v1/traces"}
        by_name = {span.name: span for span in spans}
        assert wanted <= set(by_name), f"spans of the trace: {sorted(by_name)}; log:\n{server.log()[-3000:]}"

    # Three processes: the API, the scheduler and the executor, each its own service and pid.
    services = {span.service: span.pid for span in spans}
    assert {"pied", "pied-scheduler", "pied-executor"} <= set(services)
    assert len(set(services.values())) == len(services)

    api = by_name["POST /v1/chat/completions"]
    assert api.service == "pied" and api.kind == ProtoSpan.SPAN_KIND_SERVER
    assert api.parent_span_id == CALLER_SPAN_ID  # the traceparent header's span
    usage = answer["usage"]
    expected = {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "pied",
        "gen_ai.request.model": "tiny",
        "gen_ai.request.max_tokens": 6,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "gen_ai.usage.cache_read.input_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "gen_ai.response.finish_reasons": ["length"],
        "gen_ai.response.id": answer["id"],
    }
    assert {key: api.attributes.get(key) for key in expected} == expected
    assert "gen_ai.system" not in api.attributes  # deprecated by gen_ai.provider.name
    assert usage["completion_tokens"] == 6

    queue, prefill, decode = by_name[QUEUE_SPAN], by_name[PREFILL_SPAN], by_name[DECODE_SPAN]
    for span in (queue, prefill, decode):
        assert span.service == "pied-scheduler" and span.parent_span_id == api.span_id
    assert queue.end_time_ns == prefill.start_time_ns and prefill.end_time_ns == decode.start_time_ns
    assert api.start_time_ns <= queue.start_time_ns and decode.end_time_ns <= api.end_time_ns
    assert prefill.attributes["pied.request.num_prompt_tokens"] == usage["prompt_tokens"]
    assert decode.attributes["pied.request.finish_reason"] == "length"
    assert decode.attributes["pied.request.num_output_tokens"] == 6
    assert decode.attributes["pied.request.num_preemptions"] == 0

    # The forward passes over the prompt, in the executor, under the scheduler's prefill span.
    executes = [span for span in spans if span.name == EXECUTE_SPAN]
    for span in executes:
        assert span.service == "pied-executor" and span.parent_span_id == prefill.span_id
    assert (
        sum(span.attributes["pied.request.num_scheduled_tokens"] for span in executes)
        == usage["prompt_tokens"]
    )


def test_without_an_endpoint_nothing_is_exported_and_no_thread_starts(clean_otel_environment, monkeypatch):
    from pied.api.app import create_app
    from workers.executor.actor import ExecutorActor
    from workers.scheduler.actor import SchedulerActor

    def no_exporter(target: OtlpTarget) -> None:
        raise AssertionError(f"an exporter was made for {target}")

    monkeypatch.setattr("workers.tracing.otlp_exporter", no_exporter)
    threads_before = set(threading.enumerate())
    config = EngineConfig(block_size=4)
    tracer = setup_tracing("pied", config)
    assert not tracing_enabled(tracer)
    span = tracer.start_span("POST /v1/chat/completions")
    assert not span.is_recording() and not span.get_span_context().is_valid
    span.end()

    context = zmq.asyncio.Context()
    addresses = Addresses.inproc()
    scheduler = SchedulerActor(config, addresses, context=context)
    executor = ExecutorActor(config, addresses, context=context, runner_factory=FakeRunner)
    assert scheduler.request_spans is None and executor.step_spans is None and executor.channel is None
    app = create_app(SimpleNamespace(), tracer=tracer)  # type: ignore[arg-type]
    assert all(middleware.__name__ != "trace_request" for middleware in app.middlewares)
    assert set(threading.enumerate()) == threads_before and not otel_threads()
    assert shutdown_tracing(tracer)
    context.term()


# ---------------------------------------------------------------- where spans go


def test_otlp_target_from_the_flag_and_the_standard_variables():
    assert otlp_target(None, {}) is None
    assert otlp_target("http://jaeger:4318", {}) == OtlpTarget("http://jaeger:4318/v1/traces", HTTP_PROTOBUF)
    assert otlp_target("localhost:4318/", {}) == OtlpTarget("http://localhost:4318/v1/traces", HTTP_PROTOBUF)
    assert otlp_target("https://c.example/otlp/v1/traces", {}).endpoint == "https://c.example/otlp/v1/traces"
    # A path of the flag's own is the traces URL as given (vLLM's --otlp-traces-endpoint).
    assert otlp_target("http://c:4318/custom/traces", {}).endpoint == "http://c:4318/custom/traces"
    assert otlp_target(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/base"}).endpoint == (
        "http://c:4318/base/v1/traces"  # the base variable always gets the signal's path
    )
    assert otlp_target("grpc://jaeger:4317", {}) == OtlpTarget("http://jaeger:4317", GRPC)
    grpc = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert otlp_target("https://c.example:4317", grpc) == OtlpTarget("https://c.example:4317", GRPC)
    # The base variable gets the signal path; the traces variable is used as it is; the flag wins.
    assert (
        otlp_target(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}).endpoint
        == "http://c:4318/v1/traces"
    )
    traces = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
    }
    assert otlp_target(None, traces).endpoint == "http://c:4318/custom"
    assert otlp_target("http://flag:4318", traces).endpoint == "http://flag:4318/v1/traces"
    assert otlp_target(None, {**grpc, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}).protocol == GRPC
    assert otlp_target("http://c:4318", {"OTEL_SDK_DISABLED": "true"}) is None
    with pytest.raises(ConfigError, match="http/json"):
        otlp_target("http://c:4318", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(ConfigError, match="no host"):
        otlp_target("http://:4318", {})
    with pytest.raises(ConfigError, match="port must be in 1-65535"):
        otlp_target("http://127.0.0.1:99999", {})
    with pytest.raises(ConfigError, match="grpc://"):
        otlp_target("ftp://c:21", {})
    with pytest.raises(ConfigError, match="trace-layers-every"):
        EngineConfig(trace_layers_every=-1).validate()


@pytest.fixture
def otlp_grpc_receiver():
    """The same receiver behind OTLP/gRPC's TraceService."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    store = SpanStore()

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:  # noqa: N802
            store.add("grpc", request)
            return ExportTraceServiceResponse()

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield store, port
    server.stop(None)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_setup_tracing_exports_with_the_process_resource(clean_otel_environment, request, protocol):
    if protocol == "grpc":
        receiver, port = request.getfixturevalue("otlp_grpc_receiver")
        endpoint = f"grpc://127.0.0.1:{port}"
    else:
        receiver = request.getfixturevalue("otlp_receiver")
        endpoint = f"http://127.0.0.1:{receiver.port}"
    tracer = setup_tracing("pied-test", EngineConfig(otlp_endpoint=endpoint))
    assert tracing_enabled(tracer) and otel_threads()
    parent = parent_context(TRACEPARENT)
    with tracer.start_as_current_span("outer", context=parent) as outer:
        assert traceparent(outer.get_span_context()).startswith(f"00-{TRACE_ID}-")
    assert shutdown_tracing(tracer)  # flushes
    (span,) = receiver.trace(TRACE_ID)
    assert (span.name, span.service, span.parent_span_id) == ("outer", "pied-test", CALLER_SPAN_ID)
    assert span.pid == os.getpid()
    # An unsampled caller is recorded nowhere, and a malformed traceparent starts a new trace.
    unsampled = tracer.start_span("x", context=parent_context(f"00-{TRACE_ID}-{CALLER_SPAN_ID}-00"))
    assert not unsampled.is_recording()
    assert parent_context("00-nonsense") is None and parent_context("") is None


# ---------------------------------------------------------------- the scheduler's spans


def memory_tracer(span_ids: PresetSpanIds | None = None) -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), id_generator=span_ids, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def add(scheduler: Scheduler, spans: RequestSpans, request_id: str, parent: str, max_tokens: int = 4) -> None:
    params = proto.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    message = proto.AddRequest(request_id, proto.pack_i32([1, 3, 5, 7, 9]), params, time.time(), parent)
    assert scheduler.add_request(message) == []
    spans.arrived(message, scheduler.requests.get(request_id))


def run_scheduler(scheduler: Scheduler, spans: RequestSpans) -> dict[str, str]:
    """Step until idle with a fake executor (token 7); returns each request's executor traceparent."""
    sent = {}
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        assert plan is not None
        spans.scheduled(plan, scheduler.num_preemptions, time.time_ns())
        sent.update({new.request_id: new.trace_context for new in plan.new_requests})
        result = proto.StepResult(plan.step_id, proto.pack_i32([7] * sum(plan.sample)))
        spans.stepped(scheduler.postprocess(plan, result), time.time_ns())
    return sent


def spans_of(exporter: InMemorySpanExporter, request_id: str) -> dict[str, ReadableSpan]:
    spans = [
        span for span in exporter.get_finished_spans() if span.attributes.get("pied.request.id") == request_id
    ]
    return {span.name: span for span in spans}


def test_scheduler_spans_queue_prefill_decode_under_the_api_span():
    span_ids = PresetSpanIds()
    tracer, exporter = memory_tracer(span_ids)
    api = tracer.start_span("POST /v1/chat/completions")
    scheduler = Scheduler(EngineConfig(block_size=4), 64, {2}, 128)
    spans = RequestSpans(tracer, span_ids)
    add(scheduler, spans, "a", traceparent(api.get_span_context()))
    add(scheduler, spans, "untraced", "")
    add(scheduler, spans, "unsampled", f"00-{TRACE_ID}-{CALLER_SPAN_ID}-00")
    sent = run_scheduler(scheduler, spans)
    assert spans.num_tracked == 0 and sent["untraced"] == "" and sent["unsampled"] == ""

    found = spans_of(exporter, "a")
    assert set(found) == {QUEUE_SPAN, PREFILL_SPAN, DECODE_SPAN}
    assert {span.parent.span_id for span in found.values()} == {api.get_span_context().span_id}
    queue, prefill, decode = found[QUEUE_SPAN], found[PREFILL_SPAN], found[DECODE_SPAN]
    assert queue.start_time <= queue.end_time == prefill.start_time <= prefill.end_time == decode.start_time
    # The executor got the prefill span as its parent before the span existed.
    assert sent["a"] == traceparent(prefill.context)
    assert decode.attributes["pied.request.finish_reason"] == "length"
    assert decode.attributes["pied.request.num_output_tokens"] == 4
    assert "pied.request.finish_reason" not in prefill.attributes
    assert len(exporter.get_finished_spans()) == 3  # nothing for the untraced and unsampled requests


def test_scheduler_spans_of_aborts_errors_and_preemptions():
    span_ids = PresetSpanIds()
    tracer, exporter = memory_tracer(span_ids)
    parent = traceparent(tracer.start_span("api").get_span_context())
    # 6 blocks of 4 tokens: two requests growing to 5 + 12 tokens each cannot both keep running.
    scheduler = Scheduler(EngineConfig(block_size=4), 6, {2}, 128)
    spans = RequestSpans(tracer, span_ids)
    add(scheduler, spans, "first", parent, max_tokens=12)
    add(scheduler, spans, "second", parent, max_tokens=12)
    add(scheduler, spans, "queued", parent)
    spans.finished(scheduler.abort_requests(["queued"]), time.time_ns())
    run_scheduler(scheduler, spans)
    assert scheduler.num_preemptions >= 1
    preemptions = [
        spans_of(exporter, name)[DECODE_SPAN].attributes["pied.request.num_preemptions"]
        for name in ("first", "second")
    ]
    assert sum(preemptions) == scheduler.num_preemptions

    (queued,) = spans_of(exporter, "queued").values()  # aborted while waiting: its queue span only
    assert queued.name == QUEUE_SPAN and queued.attributes["pied.request.finish_reason"] == "abort"
    assert queued.status.status_code == StatusCode.UNSET

    add(scheduler, spans, "failed", parent)
    plan = scheduler.schedule()
    spans.scheduled(plan, scheduler.num_preemptions, time.time_ns())
    deltas = scheduler.postprocess(plan, proto.StepResult(plan.step_id, b"", error="CUDA error"))
    spans.stepped(deltas, time.time_ns())
    failed = spans_of(exporter, "failed")
    assert set(failed) == {QUEUE_SPAN, PREFILL_SPAN}
    assert failed[PREFILL_SPAN].status.status_code == StatusCode.ERROR
    assert "CUDA error" in failed[PREFILL_SPAN].status.description


# ---------------------------------------------------------------- the executor's spans


def step_plan(
    step_id: int,
    new: list[proto.NewRequestData],
    request_ids: list[str],
    num_tokens: list[int],
    sample: list[int],
) -> proto.StepPlan:
    return proto.StepPlan(
        step_id=step_id,
        request_ids=request_ids,
        num_scheduled_tokens=proto.pack_i32(num_tokens),
        token_ids=proto.pack_i32([1] * sum(num_tokens)),
        start_positions=proto.pack_i32([0] * len(request_ids)),
        num_blocks=proto.pack_i32([1] * len(request_ids)),
        block_tables=proto.pack_i32(list(range(len(request_ids)))),
        sample=bytes(sample),
        new_requests=new,
    )


def test_step_spans_execute_under_prefill_step_on_the_channel_layers_when_sampled():
    tracer, otlp = memory_tracer()
    channel, collected = memory_tracer()
    prefill = tracer.start_span("prefill")
    parent = traceparent(prefill.get_span_context())
    params = proto.SamplingParams()
    step_spans = StepSpans(tracer, channel, trace_layers_every=2)
    new = [proto.NewRequestData("a", b"", params, parent), proto.NewRequestData("b", b"", params, "")]
    result = proto.StepResult(
        0,
        b"",
        forward_time=0.004,
        num_host_blocks=3,
        bytes_to_device=4096,
        stall_time=0.001,
        copy_time=0.002,
        link_bandwidth=5e9,
    )

    # Step 0: a's first chunk (no token yet) and b: an execute span for a only; layers sampled.
    plan = step_plan(0, new, ["a", "b"], [8, 5], [0, 1])
    step_spans.begin(plan)
    assert step_spans.samples_layers(plan)
    start = time.time_ns()
    timing = StepTiming(
        start, start + 5_000_000, 1_000, [(1_000, 2_000_000, 0.0), (2_000_000, 4_000_000, 0.001)]
    )
    step_spans.end(plan, result, timing)
    # Step 1: a's last chunk, with its first token; step 2: decode only.
    for step_id, tokens in ((1, [2, 1]), (2, [1, 1])):
        plan = step_plan(step_id, [], ["a", "b"], tokens, [1, 1])
        step_spans.begin(plan)
        step_spans.end(plan, result, StepTiming(start, start + 1_000, 0))

    executes = [span for span in otlp.get_finished_spans() if span.name == EXECUTE_SPAN]
    assert [span.attributes["pied.request.num_scheduled_tokens"] for span in executes] == [8, 2]
    assert {span.parent.span_id for span in executes} == {prefill.get_span_context().span_id}
    assert {span.context.trace_id for span in executes} == {prefill.get_span_context().trace_id}

    # Every step on the channel, with its numbers; only sampled steps over OTLP.
    steps = [span for span in collected.get_finished_spans() if span.name == span_names.STEP_SPAN]
    assert [span.attributes[span_names.STEP_ID] for span in steps] == [0, 1, 2]
    first = steps[0].attributes
    assert first[span_names.STEP_NUM_REQUESTS] == 2 and first[span_names.STEP_NUM_TOKENS] == 13
    assert first[span_names.STEP_NUM_HOST_BLOCKS] == 3 and first[span_names.STEP_BYTES_TO_DEVICE] == 4096
    assert first[span_names.STEP_STALL_TIME] == 0.001 and first[span_names.STEP_LAYERS_TRACED]
    assert (first[span_names.STEP_COPY_TIME], first[span_names.STEP_LINK_BANDWIDTH]) == (0.002, 5e9)
    # ... and the memory manager reads back what its controller needs.
    read_back = step_sample_from_span(span_record(steps[0]), num_layers=2)
    assert (read_back.copy_time, read_back.link_bandwidth, read_back.stall_time) == (0.002, 5e9, 0.001)
    assert steps[0].parent is None and (steps[0].start_time, steps[0].end_time) == (start, start + 5_000_000)
    layers = [span for span in collected.get_finished_spans() if span.name == span_names.LAYER_SPAN]
    assert [span.attributes[span_names.LAYER_INDEX] for span in layers] == [0, 1]
    assert {span.parent.span_id for span in layers} == {steps[0].context.span_id}
    assert (
        layers[1].start_time == start + 2_000_000 - 1_000
        and layers[1].attributes[span_names.LAYER_STALL_TIME] == 0.001
    )
    exported_steps = [span for span in otlp.get_finished_spans() if span.name == span_names.STEP_SPAN]
    assert [span.attributes[span_names.STEP_ID] for span in exported_steps] == [0, 2]
    assert [link.context.span_id for link in exported_steps[0].links] == [executes[0].context.span_id]


class FakeRunner:
    """A model runner without a model that times its 'layers' when asked (LayerTimedRunner)."""

    num_device_blocks = 64
    model_config = SimpleNamespace(eos_token_ids=frozenset({2}), max_position_embeddings=512, vocab_size=512)
    num_layers = 3

    def __init__(self, config: EngineConfig) -> None:
        self.block_size = config.block_size
        self.record_layer_times = False
        self.layer_times: list[tuple[int, int, float]] = []

    def close(self) -> None:
        pass

    def execute(self, plan: proto.StepPlan) -> proto.StepResult:
        self.layer_times = []
        for _ in range(self.num_layers):
            start = time.perf_counter_ns()
            time.sleep(0.001)
            if self.record_layer_times:
                self.layer_times.append((start, time.perf_counter_ns(), 0.0))
        samples = sum(plan.sample)
        return proto.StepResult(
            plan.step_id, proto.pack_i32([7] * samples), forward_time=0.003, bytes_to_device=512
        )


async def test_executor_ships_its_step_spans_over_inproc():
    context = zmq.asyncio.Context()
    receiver = SpanReceiver("inproc://test-span-channel", context)
    config = EngineConfig(block_size=4, trace_layers_every=2)
    try:
        plans = [step_plan(step_id, [], ["r"], [1], [1]) for step_id in range(4)]
        await run_executor_steps(config, FakeRunner, plans, context, span_collector=receiver.address)
        batches = receiver.drain()  # the executor's on_stop flushed the channel
    finally:
        receiver.close()
        context.term()

    records = [record for batch in batches for record in batch.spans]
    assert {(batch.service, batch.pid) for batch in batches} == {
        ("pied-executor", os.getpid())
    }  # a thread here
    steps = [record for record in records if record.name == span_names.STEP_SPAN]
    assert [record.attributes[span_names.STEP_ID] for record in steps] == [0, 1, 2, 3]
    assert all(record.attributes[span_names.STEP_BYTES_TO_DEVICE] == 512 for record in steps)
    assert [record.attributes[span_names.STEP_LAYERS_TRACED] for record in steps] == [
        True,
        False,
        True,
        False,
    ]
    layers = [record for record in records if record.name == span_names.LAYER_SPAN]
    assert len(layers) == 2 * FakeRunner.num_layers
    for step in steps[::2]:
        check_step_layers(records, step, FakeRunner.num_layers)


# ---------------------------------------------------------------- the span channel


@pytest.mark.parametrize("transport", ["inproc", "ipc"])
def test_span_channel_round_trip(transport: str, tmp_path) -> None:
    address = "inproc://round-trip" if transport == "inproc" else f"ipc://{tmp_path}/spans"
    context = zmq.Context()
    receiver = SpanReceiver(address, context)
    tracer = span_channel_tracer("pied-executor", address, context)
    try:
        step = tracer.start_span(
            span_names.STEP_SPAN,
            start_time=1_000,
            attributes={span_names.STEP_ID: 7, "pied.tags": ("a", "b")},
        )
        layer = tracer.start_span(
            span_names.LAYER_SPAN, context=trace.set_span_in_context(step), start_time=1_100
        )
        layer.end(end_time=1_900)
        step.set_status(trace.Status(StatusCode.ERROR, "boom"))
        step.end(end_time=2_000)
        records: list[SpanRecord] = []
        deadline = time.monotonic() + 10
        while len(records) < 2 and time.monotonic() < deadline:
            batch = receiver.receive(timeout=1.0)
            if batch is not None:
                assert batch.service == "pied-executor" and batch.pid > 0
                records += batch.spans
    finally:
        shutdown_tracing(tracer)
        receiver.close()
        context.term()
    layer_record, step_record = records  # oldest first: the layer ended first
    context_of_step = step.get_span_context()
    assert step_record == SpanRecord(
        name=span_names.STEP_SPAN,
        trace_id=context_of_step.trace_id.to_bytes(16, "big"),
        span_id=context_of_step.span_id,
        start_time_ns=1_000,
        end_time_ns=2_000,
        attributes={span_names.STEP_ID: 7, "pied.tags": ["a", "b"]},
        status=StatusCode.ERROR.value,
        status_message="boom",
    )
    assert (
        layer_record.parent_span_id == context_of_step.span_id
        and layer_record.trace_id == step_record.trace_id
    )
    assert (layer_record.start_time_ns, layer_record.end_time_ns) == (1_100, 1_900)


def test_span_receiver_survives_garbage_and_the_wire_format_round_trips() -> None:
    context = zmq.Context()
    with SpanReceiver("inproc://garbage", context) as receiver:
        sender = context.socket(zmq.PUSH)
        sender.connect("inproc://garbage")
        batch = SpanBatch("pied-executor", 42, [SpanRecord("step", b"\x01" * 16, 2**64 - 1, 5, 6)])
        sender.send(b"not msgpack")
        sender.send(msgspec.msgpack.encode(batch))
        assert receiver.receive(timeout=5) == batch
        assert receiver.drain() == []
        sender.close()
    context.term()
    # A NewRequestData from before trace_context existed still decodes (the field is last, defaulted).
    old = msgspec.msgpack.encode(["r", b"", proto.SamplingParams()])
    assert msgspec.msgpack.decode(old, type=proto.NewRequestData).trace_context == ""
    new = proto.NewRequestData("r", b"", proto.SamplingParams(), TRACEPARENT)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=proto.NewRequestData) == new


# ---------------------------------------------------------------- per-layer spans from the real runner


@pytest.mark.e2e
async def test_real_runner_exports_each_sampled_steps_layers_with_a_stall_on_a_throttled_link(
    tiny_model_dir, otlp_receiver, clean_otel_environment
):
    """The model runner itself times a sampled step's layers (hooks at layer boundaries, the copy
    thread's stamps, the streamer's waits): its ``step`` span reaches an OTLP receiver with one
    ``layer`` child per layer, in layer order, each with its ``compute`` and, for the host blocks
    the step streams over a throttled link, its ``host load``, ``wait`` (the stall) and
    ``write-back`` children."""
    from engine_driver import generate, running_engine
    from test_pooling import REQUESTS

    from workers.executor.step_spans import COMPUTE_SPAN, LOAD_SPAN, WAIT_SPAN, WRITE_BACK_SPAN

    # Six layers and a ring of two areas: layers 2.. load during the step itself (a two-layer
    # model's whole step is prefetched during the previous one), each far slower than its compute.
    model = tiny_model_dir("llama", num_hidden_layers=6)
    async with running_engine(
        model,
        device_kv_blocks=24,  # the batch overflows it: decode steps stream host blocks
        kv_policy="pie",
        expansion="fixed:160",
        trace_layers_every=2,
        otlp_endpoint=f"http://127.0.0.1:{otlp_receiver.port}",
        extra={"copy_throttle_bytes_per_s": 2e5},  # 5 ms per 1 KiB page: far slower than a layer
    ) as engine:
        num_layers = engine.actor("executor").runner.model_config.num_layers
        await generate(engine, REQUESTS, 8, timeout=300)
    # Shut down: the exporters flushed.
    spans = [span for span in otlp_receiver.spans if span.service == "pied-executor"]
    steps = [span for span in spans if span.name == span_names.STEP_SPAN]
    assert steps and all(span.attributes[span_names.STEP_ID] % 2 == 0 for span in steps)  # sampled only
    stalled = 0
    for step in steps:
        layers = check_step_layers(spans, step, num_layers)
        if step.attributes[span_names.STEP_NUM_HOST_BLOCKS] == 0:
            continue
        for layer in layers:
            load = layer.one(LOAD_SPAN)
            assert layer.phases[COMPUTE_SPAN] or layer.phases[WAIT_SPAN]
            if layer.phases[WAIT_SPAN]:
                stalled += 1
                # It ended when the load did (the copy thread's clock, read back on the compute thread's).
                assert layer.one(WAIT_SPAN).end_time_ns >= load.end_time_ns - 1_000_000
    # The throttled link shows: some sampled streaming step waited for its host pages.
    streaming = sum(step.attributes[span_names.STEP_NUM_HOST_BLOCKS] > 0 for step in steps)
    print(f"{len(steps)} sampled steps, {streaming} streaming, {stalled} layers stalled")
    assert stalled > 0
    assert any(span.name == WRITE_BACK_SPAN for span in spans)  # decode steps write K/V into host blocks
