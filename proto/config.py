"""Engine configuration: one typed object, checked once by the daemon before any worker starts (from
CLI flags, a TOML file or keyword arguments to ``pied.LLM``) and handed to every worker as it is.
Flag names follow vLLM's where vLLM has one.

It lives in ``proto`` because it is part of what the workers receive (``WorkerArgs``); like the rest
of ``proto`` it imports nothing of ours."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from proto.plan import EnginePlan


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float")
KV_POLICIES = ("none", "swap", "pie")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_FIXED_EXPANSION = re.compile(r"fixed:(\d+)")
_INIT_METHOD = re.compile(r"env://|tcp://[^:/\s]+:\d+")


def parse_expansion(expansion: str) -> int | None:
    """``fixed:N`` -> N host blocks; ``adaptive`` -> None."""
    if expansion == "adaptive":
        return None
    match = _FIXED_EXPANSION.fullmatch(expansion)
    if match is None:
        raise ConfigError(
            f"--expansion must be 'adaptive' or 'fixed:N' (N host blocks, e.g. fixed:256), got {expansion!r}."
        )
    return int(match.group(1))


@dataclass
class EngineConfig:
    model: str = ""
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings (capped to the KV pool)
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True  # share full KV blocks by content (DESIGN.md "Beyond the paper")
    device_kv_blocks: int | None = None  # exact number of device KV blocks (per layer)
    device_kv_gib: float | None = None  # or a size; default: gpu_memory_utilization on CUDA, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9
    # Paged attention kernels (DESIGN.md "Executor on accelerators"): auto = triton on CUDA, torch
    # elsewhere; triton on CPU runs in Triton's interpreter (TRITON_INTERPRET=1, for tests).
    attention_backend: str = "auto"  # auto | torch | triton
    # Decode steps replay CUDA graphs captured at padded batch sizes (workers/executor/graphs.py);
    # True runs every step eagerly (vLLM's flag and meaning). Graphs exist on CUDA only.
    enforce_eager: bool = False
    # Overlap scheduling with compute (vLLM's --async-scheduling): the scheduler plans step t+1 while
    # step t runs, with "the token step t samples" as a placeholder the executor fills in; one plan
    # ahead at most. Output is identical either way (workers/scheduler/scheduler.py).
    async_scheduling: bool = False
    max_logprobs: int = 20
    served_model_name: str | None = None
    # Host memory pooling (DESIGN.md "KV memory").
    kv_policy: str = "none"  # none | swap | pie
    host_kv_gib: float = 0.0
    expansion: str = "adaptive"  # adaptive | fixed:N
    prefetch_depth: int = 1
    stall_target: float = 0.02
    # Tracing (DESIGN.md "Tracing"): where every process exports its spans over OTLP (None: the
    # OTEL_EXPORTER_OTLP_* variables, else nowhere), and every how many steps the executor traces
    # each layer (0: never).
    otlp_endpoint: str | None = None
    trace_layers_every: int = 0
    # Seconds one forward pass may take before the engine counts as hung and dies (a device or copy
    # deadlock never returns). None: derived from the measured step times with a generous floor
    # (workers.executor.step_deadline).
    step_timeout: float | None = None
    # Tensor parallelism (DESIGN.md "Parallelism"): N executor ranks joined by torch.distributed
    # (nccl on CUDA, gloo on CPU). The rendezvous follows torchrun's vocabulary: ``env://`` (the
    # default) reads MASTER_ADDR/MASTER_PORT (the supervisor sets them unless they are set already),
    # ``tcp://host:port`` names the rank-0 store; ``nnodes``/``node_rank`` count machines as torchrun
    # does: node 0 (the head) runs the API, the scheduler, the memory manager and its ranks, node K
    # its T/N ranks only, over TCP ports derived from the rendezvous (pied.multinode).
    tensor_parallel_size: int = 1
    distributed_init_method: str = "env://"
    nnodes: int = 1
    node_rank: int = 0
    extra: dict = field(default_factory=dict)
    # What the daemon's preflight derived (pied.preflight): set by it only, never a flag. A config
    # that carries a plan has been checked; the workers build from the plan.
    plan: EnginePlan | None = None

    def validate(self) -> EngineConfig:
        """Check every value on its own and against the others (nothing here reads the model
        folder or the machine: that is the preflight's part). Raises ConfigError naming the flag."""
        self._check_types()
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not supported; use auto, float32, bfloat16 or float16.")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"--device {self.device!r} is not a device; use auto, cpu, cuda or cuda:N.")
        if not -(1 << 63) <= self.seed < (1 << 64):  # what torch.manual_seed takes
            raise ConfigError(f"--seed must fit in 64 bits, got {self.seed}.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a positive power of two, got {self.block_size}.")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be at least 1.")
        if self.max_num_seqs < 1:
            raise ConfigError("--max-num-seqs must be at least 1.")
        if self.device_kv_blocks is not None and self.device_kv_blocks < 1:
            raise ConfigError("--device-kv-blocks must be at least 1.")
        if self.device_kv_gib is not None and not (math.isfinite(self.device_kv_gib) and self.device_kv_gib > 0):
            raise ConfigError(f"--device-kv-gib must be a positive number of GiB, got {self.device_kv_gib}.")
        if self.device_kv_blocks is not None and self.device_kv_gib is not None:
            raise ConfigError("--device-kv-blocks and --device-kv-gib are both given; keep one.")
        if not (0 < self.gpu_memory_utilization <= 1):
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}."
            )
        if self.max_logprobs < 0:
            raise ConfigError(f"--max-logprobs must be non-negative, got {self.max_logprobs}.")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("--served-model-name must not be empty.")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(
                f"--attention-backend must be auto, torch or triton, got {self.attention_backend!r}."
            )
        if self.kv_policy not in KV_POLICIES:
            raise ConfigError(f"--kv-policy must be none, swap or pie, got {self.kv_policy!r}.")
        if not (math.isfinite(self.host_kv_gib) and self.host_kv_gib >= 0):
            raise ConfigError(f"--host-kv-gib must be a non-negative number of GiB, got {self.host_kv_gib}.")
        if self.host_kv_gib > 0 and self.kv_policy == "none":
            raise ConfigError(
                f"--host-kv-gib {self.host_kv_gib:g} is host memory for --kv-policy pie or swap, unused with "
                "--kv-policy none: add --kv-policy pie, or drop --host-kv-gib."
            )
        fixed = parse_expansion(self.expansion)
        if fixed is not None and fixed < 1:
            raise ConfigError(
                "--expansion fixed:0 pools no host block; give N >= 1, or use --kv-policy none."
            )
        if self.prefetch_depth < 1:
            raise ConfigError(
                f"--prefetch-depth must be at least 1 (how many layers ahead host KV is loaded), "
                f"got {self.prefetch_depth}."
            )
        if not (0 < self.stall_target < 1):
            raise ConfigError(
                f"--stall-target must be a fraction of step time in (0, 1) (0.02 is 2%), got {self.stall_target}."
            )
        if self.trace_layers_every < 0:
            raise ConfigError("--trace-layers-every must be non-negative (0 traces no layer).")
        if self.step_timeout is not None and not (math.isfinite(self.step_timeout) and self.step_timeout > 0):
            raise ConfigError(
                f"--step-timeout must be a positive number of seconds, got {self.step_timeout}."
            )
        self._validate_parallel()
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("--max-model-len must be at least 1.")
        if not self.enable_chunked_prefill and self.max_model_len and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                "--max-num-batched-tokens must be at least --max-model-len when chunked prefill is off."
            )
        return self

    def _validate_parallel(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}.")
        if not _INIT_METHOD.fullmatch(self.distributed_init_method):
            raise ConfigError(
                "--distributed-init-method must be env:// or tcp://HOST:PORT (torchrun's rendezvous), "
                f"got {self.distributed_init_method!r}."
            )
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(
                f"--node-rank must be in [0, --nnodes) and --nnodes at least 1, got {self.node_rank} of {self.nnodes}."
            )
        if self.tensor_parallel_size % self.nnodes:
            raise ConfigError(
                f"--tensor-parallel-size {self.tensor_parallel_size} does not split over --nnodes {self.nnodes}: "
                "every node runs the same number of ranks, so the size must be a multiple of --nnodes."
            )

    def _check_types(self) -> None:
        """Each value has its field's type (``pied.LLM`` keyword arguments bypass argparse)."""
        hints = typing.get_type_hints(EngineConfig)
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            allowed = typing.get_args(hints[item.name]) or (hints[item.name],)
            if value is None and type(None) in allowed:
                continue
            if any(_is_instance(value, kind) for kind in allowed if kind is not type(None)):
                continue
            names = " or ".join(_TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind))) for kind in allowed)
            flag = "--" + item.name.replace("_", "-")
            raise ConfigError(f"{flag} must be {names}, not {type(value).__name__} ({value!r}).")

    def resolved_model(self) -> Path:
        if not self.model:
            raise ConfigError("no model folder given; pass --model (the daemon fills in its bundled default).")
        return Path(self.model)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        forced = os.environ.get("PIED_DEVICE")
        if forced:
            return forced
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_attention_backend(self, device_type: str) -> str:
        """``torch`` or ``triton``: what ``auto`` means on ``device_type``."""
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if device_type == "cuda" else "torch"

    def replace(self, **changes) -> EngineConfig:
        """A copy with ``changes``; without its plan unless one is given (the plan was derived from
        the values being changed)."""
        changes.setdefault("plan", None)
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a dict"}
_TYPE_NAMES[type(None)] = "None"


def _is_instance(value: object, kind: object) -> bool:
    if kind is float:  # an int is a fine float; a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(kind) or kind
    return isinstance(origin, type) and isinstance(value, origin)
