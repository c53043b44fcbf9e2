"""The engine's workers by name, and how to build each one's actor (DESIGN.md "Processes").

The same three actors are the only engine: :func:`build_actor` makes one from its
:class:`~workers.actor.WorkerArgs`, whether it will run in its own process (``python -m
workers.<name>``, over ``ipc://``) or as an :class:`~workers.actor.ActorThread` sharing the
engine's ``zmq.asyncio.Context`` (over ``inproc://``).
"""

from __future__ import annotations

import importlib

import zmq.asyncio

from workers.actor import Actor, WorkerArgs

# Start order: the scheduler waits for the executor's Ready (and the memory manager's lease) anyway.
WORKER_NAMES = ("memory", "executor", "scheduler")

_ACTOR_CLASSES = {
    "memory": ("workers.memory.actor", "MemoryActor"),
    "executor": ("workers.executor.actor", "ExecutorActor"),
    "scheduler": ("workers.scheduler.actor", "SchedulerActor"),
}


def build_actor(name: str, args: WorkerArgs, context: zmq.asyncio.Context | None = None) -> Actor:
    """The actor of worker ``name``. Imported here: only the engine that runs it loads its code
    (torch, for the executor)."""
    module, class_name = _ACTOR_CLASSES[name]
    actor_class = getattr(importlib.import_module(module), class_name)
    actor: Actor = actor_class.from_args(args, context)
    return actor


def preload(name: str) -> None:
    """Import what worker ``name`` needs before its loop heartbeats: importing torch holds the GIL
    in C code for long stretches, which would read as a hung worker (and, in threads, starve every
    other actor's loop)."""
    if name == "executor":
        importlib.import_module("workers.executor.runner")
    importlib.import_module(_ACTOR_CLASSES[name][0])
