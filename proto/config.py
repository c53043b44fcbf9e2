"""Engine configuration: one typed object, checked once by the daemon before any worker starts (from
CLI flags, a TOML file or keyword arguments to ``pied.LLM``) and handed to every worker as it is.
Flag names follow vLLM's where vLLM has one.

It lives in ``proto`` because it is part of what the workers receive (``WorkerArgs``); like the rest
of ``proto`` it imports nothing of ours."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


@dataclass
class EngineConfig:
    model: str = ""
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings
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
    extra: dict = field(default_factory=dict)

    def validate(self) -> EngineConfig:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"):
            raise ConfigError(f"--dtype {self.dtype!r} is not supported; use auto, float32, bfloat16 or float16.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a positive power of two, got {self.block_size}.")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be at least 1.")
        if self.max_num_seqs < 1:
            raise ConfigError("--max-num-seqs must be at least 1.")
        if self.device_kv_blocks is not None and self.device_kv_blocks < 1:
            raise ConfigError("--device-kv-blocks must be at least 1.")
        if self.device_kv_gib is not None and self.device_kv_gib <= 0:
            raise ConfigError("--device-kv-gib must be positive.")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(
                f"--attention-backend must be auto, torch or triton, got {self.attention_backend!r}."
            )
        if self.kv_policy not in ("none", "swap", "pie"):
            raise ConfigError(f"--kv-policy must be none, swap or pie, got {self.kv_policy!r}.")
        if self.trace_layers_every < 0:
            raise ConfigError("--trace-layers-every must be non-negative (0 traces no layer).")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("--max-model-len must be at least 1.")
        if not self.enable_chunked_prefill and self.max_model_len and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                "--max-num-batched-tokens must be at least --max-model-len when chunked prefill is off."
            )
        return self

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
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}
