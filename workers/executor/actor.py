"""The executor actor: owns the model runner and answers each StepPlan with a StepResult.

Mailbox: StepPlan (from the scheduler), Shutdown. It loads the model on its compute thread, then
sends Ready (with the model's shape) to the scheduler and the supervisor. Each forward pass runs on
the compute thread too, so aborts, heartbeats and shutdown are handled while it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import zmq.asyncio

import proto
from pied.config import EngineConfig
from workers.actor import SUPERVISOR, Actor, Addresses, WorkerArgs


class ModelShape(Protocol):
    eos_token_ids: frozenset[int] | set[int]
    max_position_embeddings: int
    vocab_size: int


class Runner(Protocol):
    """What the executor needs of ``workers.executor.runner.ModelRunner`` (tests pass fakes)."""

    num_device_blocks: int
    block_size: int
    model_config: ModelShape

    def execute(self, plan: proto.StepPlan) -> proto.StepResult: ...


def load_model_runner(config: EngineConfig) -> Runner:
    # Imported here: torch and the model code load in the worker process only.
    from workers.executor.runner import ModelRunner

    return ModelRunner(config)


def ready_message(worker: str, config: EngineConfig, runner: Runner) -> proto.Ready:
    """The model facts the scheduler and the frontend need, as the in-process engine derives them."""
    model = runner.model_config
    max_model_len = min(config.max_model_len or model.max_position_embeddings, model.max_position_embeddings)
    return proto.Ready(
        worker=worker,
        pid=os.getpid(),
        num_device_blocks=runner.num_device_blocks,
        max_model_len=max_model_len,
        eos_token_ids=sorted(model.eos_token_ids),
        block_size=runner.block_size,
        vocab_size=model.vocab_size,
    )


class ExecutorActor(Actor):
    def __init__(
        self,
        config: EngineConfig,
        addresses: Addresses,
        *,
        context: zmq.asyncio.Context | None = None,
        heartbeat_interval: float = 0.5,
        runner_factory: Callable[[EngineConfig], Runner] = load_model_runner,
    ) -> None:
        super().__init__(
            "executor",
            addresses.executor,
            context=context,
            supervisor=addresses.frontend,
            heartbeat_interval=heartbeat_interval,
        )
        self.config = config
        self.runner: Runner | None = None
        self._runner_factory = runner_factory
        self.connect("scheduler", addresses.scheduler)
        self.on(proto.StepPlan, self.handle_step_plan)

    @classmethod
    def from_args(cls, args: WorkerArgs) -> ExecutorActor:
        return cls(args.config, args.addresses, heartbeat_interval=args.heartbeat_interval)

    async def on_start(self) -> None:
        # A load error raises here and fails the actor: the supervisor gets Dead with the reason.
        self.runner = await self.run_blocking(self._runner_factory, self.config)
        ready = ready_message(self.name, self.config, self.runner)
        self.send("scheduler", ready)
        self.send(SUPERVISOR, ready)

    def handle_step_plan(self, plan: proto.StepPlan) -> None:
        # NOTE: the scheduler sends the next plan only after this one's result, and run_blocking
        # serialises forward passes on one thread anyway, so plans never overlap or reorder.
        self.spawn(self._execute(plan), f"step-{plan.step_id}")

    async def _execute(self, plan: proto.StepPlan) -> None:
        runner = self.runner
        assert runner is not None, "StepPlan before the executor was ready"
        # A forward pass that raises fails the executor (and with it the engine), as in vLLM v1: the
        # device state after a failed kernel cannot be trusted.
        result = await self.run_blocking(runner.execute, plan)
        self.send("scheduler", result)
