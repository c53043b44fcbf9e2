"""The engine plan: what the daemon's preflight derived from the configuration and the model folder,
checked once before any worker starts and handed to every worker inside its ``EngineConfig``.

The workers build from the plan and do not derive it again, so the memory manager and the executor
cannot disagree (each once computed the host plan on its own) and a setting that cannot work is
refused by the daemon with exit status 2 instead of by a worker after it started.
"""

from __future__ import annotations

import msgspec


class HostPlan(msgspec.Struct, frozen=True, kw_only=True):
    """How much host memory the engine may use for KV (DESIGN.md "KV memory").

    Invariants: ``max_host_blocks == 0`` exactly when ``kv_policy`` is ``none`` (then every other
    count is 0 too, and ``blocks_per_segment`` 1); otherwise ``1 <= blocks_per_segment <=
    max_host_blocks``, ``num_segments == ceil(max_host_blocks / blocks_per_segment)``,
    ``segment_bytes == blocks_per_segment * block_bytes`` (the last segment may be smaller),
    ``0 <= initial_lease <= max_host_blocks``, and ``num_staging_blocks`` is ``max_host_blocks``
    under ``pie`` (a step may read the whole lease) and 0 otherwise.
    """

    max_host_blocks: int = 0  # H_max: the largest lease
    blocks_per_segment: int = 1
    num_segments: int = 0
    segment_bytes: int = 0
    block_bytes: int = 0  # one host block across all layers
    num_staging_blocks: int = 0  # distinct host blocks one step may stream (the staging ring's width)
    initial_lease: int = 0  # fixed:N and swap grant it at start; adaptive starts from 0
    pinned: bool = False  # registered (page-locked, device-mapped) by the executor: CUDA, larger segments


class EnginePlan(msgspec.Struct, frozen=True, kw_only=True):
    """The checked plan of one engine.

    ``model_path`` is absolute; ``device`` is resolved (``cpu``, ``cuda``, ``cuda:N``, never
    ``auto``); ``dtype`` is the dtype the model runs in (``float32``, ``bfloat16`` or ``float16``).
    ``num_device_blocks`` is the device KV pool in blocks per layer, or None when only the executor
    can decide it (CUDA with ``--gpu-memory-utilization``: it depends on the memory free after the
    weights are loaded). ``max_model_len`` fits the model (at most its ``max_position_embeddings``)
    and, when ``num_device_blocks`` is known, the KV pool (device blocks, plus the largest lease
    under ``pie``). ``num_layers``, ``num_kv_heads`` and ``head_dim`` are the model's KV shape, so a
    worker that only holds KV (the memory manager) need not read the model folder; under tensor
    parallelism ``num_kv_heads`` counts every rank's KV heads (one per rank when the model has fewer).
    """

    model_path: str
    device: str
    dtype: str
    max_model_len: int
    num_device_blocks: int | None
    host: HostPlan
    num_layers: int
    num_kv_heads: int
    head_dim: int
