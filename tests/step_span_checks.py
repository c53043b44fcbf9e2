"""Shared by the tests of the executor's step spans (``test_tracing``, ``test_layer_spans``): an
``ExecutorActor`` driven over ``inproc://`` by a stand-in scheduler, and the checks every sampled
step's ``layer`` spans pass, whoever timed them (a fake runner or the real one) and however they
were received (the span channel's ``SpanRecord``s or an OTLP receiver's spans: both have
``name``, ``trace_id``, ``span_id``, ``parent_span_id``, ``start_time_ns``, ``end_time_ns``,
``attributes``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq.asyncio

import proto
import proto.spans as span_names
from proto.config import EngineConfig
from workers.actor import Actor, ActorThread, Addresses
from workers.executor.step_spans import COMPUTE_SPAN, LOAD_SPAN, WAIT_SPAN, WRITE_BACK_SPAN

PHASES = (LOAD_SPAN, WAIT_SPAN, COMPUTE_SPAN, WRITE_BACK_SPAN)


async def run_executor_steps(
    config: EngineConfig,
    runner_factory: Callable[[EngineConfig], Any],
    plans: Sequence[proto.StepPlan],
    context: zmq.asyncio.Context,
    **executor_options: Any,
) -> None:
    """Run an ``ExecutorActor`` (in a thread, on ``context``) with a stand-in scheduler and frontend:
    wait for its Ready, send each plan and wait for its StepResult, then shut it down (its
    ``on_stop`` flushes its span exporters). ``executor_options`` go to the actor."""
    from workers.executor.actor import ExecutorActor

    addresses = Addresses.inproc()
    inbox: asyncio.Queue[msgspec.Struct] = asyncio.Queue()
    peers = []
    for name, address in (("scheduler", addresses.scheduler), ("frontend", addresses.frontend)):
        peer = Actor(name, address, context=context)
        peer.on(proto.Ready, inbox.put_nowait if name == "scheduler" else lambda _: None)
        peer.on(proto.StepResult, inbox.put_nowait)
        peer.on(proto.Heartbeat, lambda _: None)
        peer.connect("executor", addresses.executor)
        peer.bind()
        peers.append((peer, asyncio.ensure_future(peer.run())))
    executor = ExecutorActor(
        config, addresses, context=context, runner_factory=runner_factory, **executor_options
    )
    thread = ActorThread(executor).start()
    scheduler = peers[0][0]
    try:
        assert isinstance(await asyncio.wait_for(inbox.get(), 10), proto.Ready)
        for plan in plans:
            scheduler.send("executor", plan)
            result = await asyncio.wait_for(inbox.get(), 10)
            assert isinstance(result, proto.StepResult) and result.step_id == plan.step_id
        scheduler.send("executor", proto.Shutdown())
        assert await asyncio.to_thread(thread.join, 10)
    finally:
        thread.stop()
        for peer, task in peers:
            peer.stop()
            await task


@dataclass
class LayerSpans:
    """One ``layer`` span and its children by phase name (each list in start order)."""

    span: Any
    phases: dict[str, list[Any]]

    def one(self, name: str) -> Any:
        (span,) = self.phases[name]
        return span


def check_step_layers(spans: Sequence[Any], step: Any, num_layers: int) -> list[LayerSpans]:
    """The ``layer`` spans of ``step`` among ``spans``, in layer order, with their phases, after
    checking what every sampled step's layers satisfy: one per layer ``0..num_layers-1``, children of
    the step in its trace, inside it, one after the other, each taking time; each phase a child of its layer, in
    the trace, labelled with the layer's index, at most once (compute twice: around a wait), the
    compute and wait spans covering the layer from its start to its end; a wait only with a stall;
    a write-back after the layer's load. Every phase span in ``spans`` is under some layer."""
    layers = sorted(
        (span for span in spans if span.name == span_names.LAYER_SPAN and span.parent_span_id == step.span_id),
        key=lambda span: span.attributes[span_names.LAYER_INDEX],
    )
    assert [span.attributes[span_names.LAYER_INDEX] for span in layers] == list(range(num_layers))
    assert all(span.trace_id == step.trace_id for span in layers)
    assert step.start_time_ns <= layers[0].start_time_ns and layers[-1].end_time_ns <= step.end_time_ns
    assert all(span.start_time_ns < span.end_time_ns for span in layers)
    for before, after in zip(layers, layers[1:]):
        assert before.end_time_ns <= after.start_time_ns
    result = []
    for index, layer in enumerate(layers):
        children = sorted(
            (span for span in spans if span.parent_span_id == layer.span_id), key=lambda span: span.start_time_ns
        )
        assert all(span.name in PHASES for span in children), [span.name for span in children]
        assert all(span.trace_id == step.trace_id for span in children)
        assert all(span.attributes[span_names.LAYER_INDEX] == index for span in children)
        assert all(span.start_time_ns <= span.end_time_ns for span in children)
        phases = {name: [span for span in children if span.name == name] for name in PHASES}
        assert len(phases[LOAD_SPAN]) <= 1 and len(phases[WAIT_SPAN]) <= 1 and len(phases[WRITE_BACK_SPAN]) <= 1
        assert len(phases[COMPUTE_SPAN]) <= 2
        on_compute = [span for span in children if span.name in (COMPUTE_SPAN, WAIT_SPAN)]
        if on_compute:
            assert on_compute[0].start_time_ns == layer.start_time_ns
            assert max(span.end_time_ns for span in on_compute) == layer.end_time_ns
        if phases[WAIT_SPAN]:
            assert layer.attributes[span_names.LAYER_STALL_TIME] > 0
        for write_back in phases[WRITE_BACK_SPAN]:
            for load in phases[LOAD_SPAN]:
                assert write_back.start_time_ns >= load.end_time_ns  # the copy FIFO: after its own load
        result.append(LayerSpans(layer, phases))
    all_layer_ids = {span.span_id for span in spans if span.name == span_names.LAYER_SPAN}
    assert all(span.parent_span_id in all_layer_ids for span in spans if span.name in PHASES)
    return result
