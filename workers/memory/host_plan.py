"""The host plan: how much host memory the engine may use for KV, and in which segments.

Derived once, by the daemon's preflight (``pied.preflight``), from the configuration and the KV
block size of the model; the memory manager and the executor read it from the ``EnginePlan`` they
are given. It checks the budget against the memory available now. No torch here: the daemon must
not load it.

The memlock limit is not checked here: whether CUDA can page-lock the pool depends on more than the
soft limit (the hard limit, which the executor raises the soft one to; root and CAP_IPC_LOCK ignore
both), so the executor probes by registering, and warns and copies from pageable memory if that
fails (:mod:`workers.executor.host_registration`).
"""

from __future__ import annotations

from proto.config import ConfigError, EngineConfig, parse_expansion
from proto.plan import HostPlan

GIB = 1 << 30
SEGMENT_BYTES = 64 << 20  # large enough to copy efficiently, small enough to grow in fine steps
# On CUDA each segment is registered (page-locked and device-mapped) once: a call that pins every
# page of it, so fewer, larger segments (the lease then grows in 512 MiB steps).
CUDA_SEGMENT_BYTES = 512 << 20
DEFAULT_HOST_KV_GIB = 1.0


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_host(
    config: EngineConfig,
    block_bytes: int,
    pinned: bool,
    available: int | None = None,
) -> HostPlan:
    """The host plan for ``config`` with host blocks of ``block_bytes`` (all layers of one block);
    ``pinned``: the executor will register the segments with CUDA (larger segments).

    ``available`` defaults to the machine's MemAvailable. Raises ConfigError naming the flag to change."""
    if config.kv_policy == "none":
        return HostPlan()
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}.")
    fixed = parse_expansion(config.expansion) if config.kv_policy == "pie" else None
    budget_gib = config.host_kv_gib or DEFAULT_HOST_KV_GIB
    if fixed is not None:
        max_host_blocks = fixed
        budget = fixed * block_bytes
        flag = f"--expansion fixed:{fixed}"
        if config.host_kv_gib and budget > config.host_kv_gib * GIB:
            # --host-kv-gib caps host memory whatever the lease (it was ignored here).
            raise ConfigError(
                f"{flag} needs {budget / GIB:.3g} GiB of host KV ({block_bytes} bytes a block), above "
                f"--host-kv-gib {config.host_kv_gib:g}: lower N to {int(config.host_kv_gib * GIB) // block_bytes} "
                "or less, or raise --host-kv-gib."
            )
    else:
        budget = int(budget_gib * GIB)
        max_host_blocks = budget // block_bytes
        flag = f"--host-kv-gib {budget_gib:g}"
    if max_host_blocks < 1:
        raise ConfigError(f"{flag} holds no host KV block ({block_bytes} bytes each); raise it.")
    available = available_memory_bytes() if available is None else available
    if available is not None and budget > available:
        raise ConfigError(
            f"{flag}: the host KV pool needs {budget / GIB:.2f} GiB but only {available / GIB:.2f} GiB of "
            "memory is available; lower it."
        )
    segment_bytes = CUDA_SEGMENT_BYTES if pinned else SEGMENT_BYTES
    blocks_per_segment = max(1, min(max_host_blocks, segment_bytes // block_bytes))
    return HostPlan(
        max_host_blocks=max_host_blocks,
        blocks_per_segment=blocks_per_segment,
        num_segments=-(-max_host_blocks // blocks_per_segment),
        segment_bytes=blocks_per_segment * block_bytes,
        block_bytes=block_bytes,
        num_staging_blocks=max_host_blocks if config.kv_policy == "pie" else 0,
        # fixed:N and swap grant the whole budget at once; adaptive starts from 0 and the
        # controller (which steers it from measured stalls) grows it.
        initial_lease=max_host_blocks,
        pinned=pinned,
    )
