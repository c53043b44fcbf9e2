"""Tensor parallelism across machines: where the head listens, and what a node takes from it.

Vocabulary as torchrun's: ``--nnodes N`` machines, ``--node-rank K`` this one; node 0 is the head
(API, scheduler, memory manager, and its own executor ranks), node K > 0 runs only executor ranks
``K * T/N .. (K + 1) * T/N - 1`` (``pied.node``). Every node is given the same rendezvous, and
every port is derived from it:

- ``--distributed-init-method tcp://HEAD:PORT``, or ``env://`` with ``MASTER_ADDR``/``MASTER_PORT``;
- ``PORT``: torch.distributed's store (rank 0's, on the head);
- ``PORT + 1``: the node link (:mod:`pied.node_link`: the handshake, the head's configuration,
  liveness both ways, stop);
- ``PORT + 2``, ``+ 3``, ``+ 4``: the supervisor's, the memory manager's and the scheduler's
  mailboxes, for what remote ranks send them (Ready, heartbeats, step spans);
- ``PORT + 4 + r``: remote rank ``r``'s mailbox (plans, segment updates, Shutdown), r >= 1.

The head listens on every interface, on these ports only when ``--nnodes`` is above 1 (one
machine stays on ``ipc://``). They carry no authentication, like torch.distributed's store: keep
them on the cluster's private network.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from proto.config import ConfigError, EngineConfig

_TCP = re.compile(r"tcp://(?P<host>[^:/\s]+):(?P<port>\d+)")
LINK, FRONTEND, MEMORY, SCHEDULER = 1, 2, 3, 4  # port offsets from the store's port

# Settings a node keeps its own: where its model folder is, which node it is, how its ranks meet
# (the same rendezvous, spelled for its environment), where it exports traces.
NODE_LOCAL_FIELDS = frozenset({"model", "node_rank", "distributed_init_method", "otlp_endpoint", "device", "plan"})


@dataclass(frozen=True)
class HeadEndpoint:
    """The head's host and torch.distributed's store port; pied's ports follow it."""

    host: str
    port: int
    tensor_parallel_size: int

    def address(self, offset: int) -> str:
        """Where a node connects for the port at ``offset``."""
        return f"tcp://{self.host}:{self.port + offset}"

    def listen(self, offset: int) -> str:
        """Where the head binds it."""
        return f"tcp://*:{self.port + offset}"

    @property
    def link_port(self) -> int:
        return self.port + LINK

    @staticmethod
    def executor_offset(rank: int) -> int:
        return SCHEDULER + rank


def head_endpoint(config: EngineConfig, environment: Mapping[str, str] | None = None) -> HeadEndpoint:
    """The head's endpoint of a multi-node ``config``; ConfigError (exit 2) when it cannot be known."""
    environment = os.environ if environment is None else environment
    match = _TCP.fullmatch(config.distributed_init_method)
    if match is not None:
        host, port_text = match["host"], match["port"]
    else:
        host, port_text = environment.get("MASTER_ADDR", ""), environment.get("MASTER_PORT", "")
        if not host or not port_text.isdigit():
            raise ConfigError(
                f"--nnodes {config.nnodes} with --distributed-init-method env:// needs MASTER_ADDR and MASTER_PORT "
                "in the environment of every node (the head's address and a free port), or give "
                "--distributed-init-method tcp://HEAD:PORT."
            )
    port = int(port_text)
    last = port + SCHEDULER + config.tensor_parallel_size - 1
    if not 0 < port or last > 65535:
        raise ConfigError(
            f"the rendezvous port {port} leaves no room for pied's ports {port + 1}..{last}; use a port "
            f"below {65536 - SCHEDULER - config.tensor_parallel_size}."
        )
    return HeadEndpoint(host, port, config.tensor_parallel_size)


def ranks_per_node(config: EngineConfig) -> int:
    return config.tensor_parallel_size // config.nnodes


def node_ranks(config: EngineConfig, node_rank: int) -> range:
    """The global tensor-parallel ranks that node ``node_rank`` runs."""
    per_node = ranks_per_node(config)
    return range(node_rank * per_node, (node_rank + 1) * per_node)


def node_of(config: EngineConfig, rank: int) -> int:
    return rank // ranks_per_node(config)


def node_config(head: EngineConfig, local: EngineConfig) -> EngineConfig:
    """The configuration node ``local.node_rank`` runs its ranks with: the head's (its plan included:
    host segments and block counts must mean the same on every rank), with the node's own model
    folder, node rank, rendezvous spelling and tracing. ConfigError when the two cannot run one
    engine (the model's shape or the device type differs)."""
    assert head.plan is not None and local.plan is not None, "both configurations are checked"
    for name in ("tensor_parallel_size", "nnodes"):
        if getattr(head, name) != getattr(local, name):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} is {getattr(local, name)} here but {getattr(head, name)} on the head.")
    for name in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
        if getattr(head.plan, name) != getattr(local.plan, name):
            raise ConfigError(
                f"the model here ({local.plan.model_path}) has {name} {getattr(local.plan, name)}, the head's "
                f"{getattr(head.plan, name)}: every node must serve the same model."
            )
    head_device, local_device = head.plan.device.split(":")[0], local.plan.device.split(":")[0]
    if head_device != local_device:
        raise ConfigError(f"this node runs on {local_device}, the head on {head_device}: use one device type.")
    plan = msgspec.structs.replace(head.plan, model_path=local.plan.model_path, device=local.plan.device)
    keep = {name: getattr(local, name) for name in NODE_LOCAL_FIELDS - {"plan"}}
    return dataclasses.replace(head, **keep, plan=plan)


def ignored_settings(head: EngineConfig, local: EngineConfig) -> list[str]:
    """The engine flags given to a node that differ from the head's (the head's rule), as flags."""
    ignored = []
    for field in dataclasses.fields(EngineConfig):
        if field.name in NODE_LOCAL_FIELDS or field.name in ("served_model_name", "extra"):
            continue
        if getattr(head, field.name) != getattr(local, field.name):
            ignored.append(f"--{field.name.replace('_', '-')} {getattr(local, field.name)}")
    return ignored
