"""The host plan: how much host memory the engine may use for KV, and in which segments.

Derived once, by the daemon's preflight (``pied.preflight``), from the configuration and the KV
block size of the model; the memory manager and the executor read it from the ``EnginePlan`` they
are given. It checks the budget against the memory available now and, when the pool will be
pinned (CUDA), against the memlock limit. No torch here: the daemon must not load it.
"""

from __future__ import annotations

import resource

from proto.config import ConfigError, EngineConfig, parse_expansion
from proto.plan import HostPlan

GIB = 1 << 30
SEGMENT_BYTES = 64 << 20  # large enough to copy efficiently, small enough to grow in fine steps
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


def memlock_limit_bytes() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes (None: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def plan_host(
    config: EngineConfig,
    block_bytes: int,
    pinned: bool,
    available: int | None = None,
    memlock: int | None = None,
) -> HostPlan:
    """The host plan for ``config`` with host blocks of ``block_bytes`` (all layers of one block).

    ``available`` and ``memlock`` default to the machine's (MemAvailable, the soft memlock limit).
    Raises ConfigError naming the flag to change."""
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
    if pinned:
        memlock = memlock_limit_bytes() if memlock is None else memlock
        if memlock is not None and budget > memlock:
            raise ConfigError(
                f"{flag}: pinning {budget / GIB:.2f} GiB of host KV needs a memlock limit at least that large "
                f"(it is {memlock / GIB:.3f} GiB): set LimitMEMLOCK=infinity in the systemd unit or "
                "`ulimit -l unlimited`, or lower it."
            )
    blocks_per_segment = max(1, min(max_host_blocks, SEGMENT_BYTES // block_bytes))
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
