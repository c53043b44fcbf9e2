"""The engine's workers by name, and how to build each one's actor (DESIGN.md "Processes").

The same three actors are the only engine: :func:`build_actor` makes one from its
:class:`~workers.actor.WorkerArgs`, whether it will run in its own process (``python -m
workers.<name>``, over ``ipc://``) or as an :class:`~workers.actor.ActorThread` sharing the
engine's ``zmq.asyncio.Context`` (over ``inproc://``).

With ``--tensor-parallel-size N`` there are N executors, one per rank: rank 0 is ``executor`` at
``Addresses.executor`` (the one the scheduler hears back from), rank ``r`` is ``executor-r`` at that
address with ``-r`` appended. Each is a worker of its own, supervised like the others.
"""

from __future__ import annotations

import importlib

import msgspec
import zmq.asyncio

from proto.config import EngineConfig
from workers.actor import Actor, Addresses, WorkerArgs

# Start order: the scheduler waits for the executor's Ready (and the memory manager's lease) anyway.
WORKER_NAMES = ("memory", "executor", "scheduler")

_ACTOR_CLASSES = {
    "memory": ("workers.memory.actor", "MemoryActor"),
    "executor": ("workers.executor.actor", "ExecutorActor"),
    "scheduler": ("workers.scheduler.actor", "SchedulerActor"),
}


def executor_name(rank: int) -> str:
    return "executor" if rank == 0 else f"executor-{rank}"


def executor_address(addresses: Addresses, rank: int) -> str:
    return addresses.executor if rank == 0 else f"{addresses.executor}-{rank}"


def executor_ranks(config: EngineConfig) -> range:
    return range(config.tensor_parallel_size)


def worker_names(config: EngineConfig) -> list[str]:
    """Every worker of an engine with ``config``, in start order (see ``WORKER_NAMES``)."""
    names = []
    for name in WORKER_NAMES:
        names += [executor_name(rank) for rank in executor_ranks(config)] if name == "executor" else [name]
    return names


def role(name: str) -> str:
    """The worker kind behind a worker's name: ``executor-1`` is an ``executor``."""
    return name.partition("-")[0]


def rank_of(name: str) -> int:
    _, _, rank = name.partition("-")
    return int(rank) if rank else 0


def worker_address(addresses: Addresses, name: str) -> str:
    if role(name) == "executor":
        return executor_address(addresses, rank_of(name))
    address: str = getattr(addresses, name)
    return address


def worker_args(args: WorkerArgs, name: str) -> WorkerArgs:
    """``args`` for worker ``name`` (an executor learns its rank)."""
    return msgspec.structs.replace(args, rank=rank_of(name))


def build_actor(name: str, args: WorkerArgs, context: zmq.asyncio.Context | None = None) -> Actor:
    """The actor of worker ``name``. Imported here: only the engine that runs it loads its code
    (torch, for the executor)."""
    module, class_name = _ACTOR_CLASSES[role(name)]
    actor_class = getattr(importlib.import_module(module), class_name)
    actor: Actor = actor_class.from_args(worker_args(args, name), context)
    return actor


def preload(name: str) -> None:
    """Import what worker ``name`` needs before its loop heartbeats: importing torch holds the GIL
    in C code for long stretches, which would read as a hung worker (and, in threads, starve every
    other actor's loop)."""
    if name == "executor":
        importlib.import_module("workers.executor.runner")
    importlib.import_module(_ACTOR_CLASSES[name][0])
