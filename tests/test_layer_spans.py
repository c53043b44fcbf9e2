"""A sampled step's pipeline in a trace: per-layer ``host load``, ``wait``, ``compute`` and
``write-back`` spans under each ``layer`` span of the executor's ``step`` span (DESIGN.md
"Tracing"), exported over OTLP/HTTP to a receiver, from a runner whose copy thread streams each
layer's host pages over a throttled link (so compute stalls)."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import pytest
import zmq.asyncio
from step_span_checks import check_step_layers, run_executor_steps
from test_tracing import OtlpReceiver, step_plan

import proto
import proto.spans as span_names
from proto.config import EngineConfig
from workers.executor.step_spans import (
    COMPUTE_SPAN,
    LOAD_SPAN,
    WAIT_SPAN,
    WRITE_BACK_SPAN,
    LayerTime,
)
from workers.tracing import EXECUTOR_SERVICE

CopyJob = tuple[str, int]  # ("load" | "write-back", layer)


class ThrottledStreamingRunner:
    """A model runner without a model that streams like ``LayerStreamer``: a copy thread works
    through a FIFO of loads and write-backs; the first ``RING`` layers' loads start with the step,
    compute waits for a layer's load before its attention, then queues the layer's write-back and
    the load of layer ``l + RING`` into the area it frees. Loads take longer than a layer's compute
    (a throttled link), so layers stall. Times are the readings each side takes anyway."""

    RING = 2
    PROJECTION_SECONDS = 0.0002  # a layer's compute before its attention needs the pages
    COMPUTE_SECONDS = 0.001
    LOAD_SECONDS = 0.004
    WRITE_BACK_SECONDS = 0.0005

    num_device_blocks = 64
    model_config = SimpleNamespace(eos_token_ids=frozenset({2}), max_position_embeddings=512, vocab_size=512)
    num_layers = 5

    def __init__(self, config: EngineConfig) -> None:
        self.block_size = config.block_size
        self.record_layer_times = False
        self.layer_times: list[LayerTime] = []

    def close(self) -> None:
        """Nothing outlives a step here: each one starts and joins its own copy thread."""

    def execute(self, plan: proto.StepPlan) -> proto.StepResult:
        jobs: queue.SimpleQueue[CopyJob | None] = queue.SimpleQueue()
        done: dict[CopyJob, threading.Event] = {}
        copied: dict[CopyJob, tuple[int, int]] = {}  # written by the copy thread before ``done``

        def copy_thread() -> None:
            while (job := jobs.get()) is not None:
                start = time.perf_counter_ns()
                time.sleep(self.LOAD_SECONDS if job[0] == "load" else self.WRITE_BACK_SECONDS)
                copied[job] = (start, time.perf_counter_ns())
                done[job].set()

        def submit(kind: str, layer: int) -> None:
            done[(kind, layer)] = threading.Event()
            jobs.put((kind, layer))

        thread = threading.Thread(target=copy_thread, name="test-copy")
        thread.start()
        forward_start = time.perf_counter()
        for layer in range(self.RING):
            submit("load", layer)
        compute_times = []
        for layer in range(self.num_layers):
            start = time.perf_counter_ns()
            time.sleep(self.PROJECTION_SECONDS)
            wait_start = time.perf_counter_ns()
            done[("load", layer)].wait()
            wait_end = time.perf_counter_ns()
            time.sleep(self.COMPUTE_SECONDS)
            compute_times.append((start, wait_start, wait_end, time.perf_counter_ns()))
            submit("write-back", layer)
            if layer + self.RING < self.num_layers:
                submit("load", layer + self.RING)
        done[("write-back", self.num_layers - 1)].wait()  # FIFO: every copy is done
        forward_time = time.perf_counter() - forward_start
        jobs.put(None)
        thread.join()
        stalls = [(wait_end - wait_start) / 1e9 for _, wait_start, wait_end, _ in compute_times]
        if self.record_layer_times:
            self.layer_times = [
                LayerTime(
                    start,
                    end,
                    stall,
                    wait_start,
                    wait_end,
                    *copied[("load", layer)],
                    *copied[("write-back", layer)],
                )
                for layer, ((start, wait_start, wait_end, end), stall) in enumerate(
                    zip(compute_times, stalls)
                )
            ]
        samples = sum(plan.sample)
        return proto.StepResult(
            plan.step_id,
            proto.pack_i32([7] * samples),
            forward_time=forward_time,
            num_host_blocks=4,
            bytes_to_device=4 * 4096 * self.num_layers,
            stall_time=sum(stalls),
        )


@pytest.mark.e2e
async def test_a_sampled_step_exports_each_layers_load_wait_compute_and_write_back():
    receiver = OtlpReceiver()
    context = zmq.asyncio.Context()
    config = EngineConfig(
        block_size=4, trace_layers_every=2, otlp_endpoint=f"http://127.0.0.1:{receiver.port}"
    )
    try:
        # Step 0 is sampled, step 1 is not.
        plans = [step_plan(step_id, [], ["r"], [1], [1]) for step_id in range(2)]
        await run_executor_steps(config, ThrottledStreamingRunner, plans, context)
    finally:
        context.term()
        receiver.close()

    spans = [span for span in receiver.spans if span.service == EXECUTOR_SERVICE]
    (step,) = [span for span in spans if span.name == span_names.STEP_SPAN]
    assert step.attributes[span_names.STEP_ID] == 0 and step.parent_span_id == ""
    layers = check_step_layers(spans, step, ThrottledStreamingRunner.num_layers)
    ring = ThrottledStreamingRunner.RING
    total_wait = 0
    for index, layer in enumerate(layers):
        load, write_back = layer.one(LOAD_SPAN), layer.one(WRITE_BACK_SPAN)
        computes = layer.phases[COMPUTE_SPAN]
        assert computes and computes[0].start_time_ns == layer.span.start_time_ns
        assert computes[-1].end_time_ns == layer.span.end_time_ns
        # Compute waits for its own layer's load; the write-back follows the layer's compute.
        assert load.end_time_ns <= computes[-1].start_time_ns
        assert write_back.start_time_ns >= layer.span.end_time_ns
        if index >= ring:  # the ring: an area is refilled only after its last layer computed
            assert load.start_time_ns >= layers[index - ring].span.end_time_ns
        stall_ns = round(layer.span.attributes[span_names.LAYER_STALL_TIME] * 1e9)
        if layer.phases[WAIT_SPAN]:
            wait = layer.one(WAIT_SPAN)
            assert wait.end_time_ns >= load.end_time_ns
            assert abs(wait.end_time_ns - wait.start_time_ns - stall_ns) <= 1
            total_wait += wait.end_time_ns - wait.start_time_ns
        else:
            assert stall_ns == 0 and len(computes) == 1
    # The throttled link shows: layers wait for their pages, and the step's stall is their waits.
    assert total_wait > 0
    assert total_wait == pytest.approx(step.attributes[span_names.STEP_STALL_TIME] * 1e9, abs=len(layers))
