"""The engine plan (``proto.plan.EnginePlan``) derived from a configuration and a model's config.

``plan_engine`` is the one derivation: the daemon's preflight (``pied.preflight``) calls it before
any worker starts and hands the result to the workers inside their ``EngineConfig``; a worker object
built without a plan (a unit test, a library caller constructing a ``ModelRunner`` directly) calls
:func:`plan_of`, which derives the same plan once. Every refusal is a ConfigError naming the flag.
No torch here: the daemon must not load it.
"""

from __future__ import annotations

import os
from pathlib import Path

from proto.config import ConfigError, EngineConfig
from proto.plan import EnginePlan, HostPlan
from workers.memory.host_plan import GIB, plan_host
from workers.model_config import DTYPE_ALIASES, ModelConfig

DEFAULT_CPU_KV_GIB = 1.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_name(name: str, checkpoint_dtype: str, device_type: str) -> str:
    """The dtype to run in for ``--dtype name`` ("auto" follows the checkpoint's dtype).

    "auto" with a float16 checkpoint runs in float32 on CPU: CPU float16 matmuls are slow or
    missing, and float16 has bfloat16's memory cost with none of its range. An explicit
    ``float16`` is honoured everywhere.
    """
    key = checkpoint_dtype if name == "auto" else DTYPE_ALIASES.get(name)
    if key is None:
        raise ConfigError(f"--dtype {name!r} is not supported; use auto, float32, bfloat16 or float16.")
    if name == "auto" and key == "float16" and device_type == "cpu":
        key = "float32"
    return key


def kv_block_bytes(model: ModelConfig, block_size: int, dtype: str, tensor_parallel_size: int = 1) -> int:
    """One block across all layers: K and V for ``block_size`` tokens of every KV head (of every
    rank's KV heads, under tensor parallelism: see :func:`num_stored_kv_heads`)."""
    num_kv_heads = num_stored_kv_heads(model, tensor_parallel_size)
    return model.num_layers * 2 * block_size * num_kv_heads * model.head_dim * DTYPE_BYTES[dtype]


def num_stored_kv_heads(model: ModelConfig, tensor_parallel_size: int) -> int:
    """KV heads held by all ranks together: the model's, or one per rank when there are fewer KV
    heads than ranks (each rank then holds a replica of the one its query heads read)."""
    return max(model.num_kv_heads, tensor_parallel_size)


def check_tensor_parallel(config: EngineConfig, model: ModelConfig, device: str) -> None:
    """Refuse a ``--tensor-parallel-size`` the model's shapes or the machine cannot split over."""
    size = config.tensor_parallel_size
    if size == 1:
        return
    flag = f"--tensor-parallel-size {size}"
    source = Path(model.path) / "config.json"
    for what, count in (
        ("num_attention_heads", model.num_heads),
        ("intermediate_size", model.intermediate_size),
        ("vocab_size", model.vocab_size),
    ):
        if count % size:
            raise ConfigError(
                f"{flag} does not divide the model's {what} ({count}, in {source}); use a size that divides it."
            )
    if model.num_kv_heads % size and size % model.num_kv_heads:
        raise ConfigError(
            f"{flag} and the model's {model.num_kv_heads} KV heads (num_key_value_heads, in {source}): one must "
            "divide the other (KV heads are split across ranks, or replicated when there are fewer)."
        )
    if model.fp8_block_size is not None:
        raise ConfigError(f"{flag}: FP8 checkpoints are not loaded sharded yet; use --tensor-parallel-size 1.")
    if device.startswith("cuda:"):
        raise ConfigError(f"{flag} runs rank r on cuda:r; use --device cuda (or auto), not {device}.")


def check_cuda_ranks(config: EngineConfig, device: str, num_devices: int) -> None:
    """Every rank needs a CUDA device of its own (on its node: T / --nnodes ranks per machine)."""
    ranks_here = config.tensor_parallel_size // config.nnodes
    if device == "cuda" and ranks_here > num_devices:
        machine = f" (on this node of {config.nnodes})" if config.nnodes > 1 else ""
        raise ConfigError(
            f"--tensor-parallel-size {config.tensor_parallel_size} needs {ranks_here} CUDA devices{machine}, one "
            f"per rank, but {num_devices} are visible."
        )


def num_staging_areas(config: EngineConfig, model: ModelConfig) -> int:
    """R: layer ``l + depth`` loads while layer ``l`` computes, so ``depth + 1`` areas (at most L)."""
    return min(config.prefetch_depth + 1, model.num_layers)


def plan_engine(
    config: EngineConfig,
    model: ModelConfig,
    device: str,
    available: int | None = None,
    num_staging_blocks: int | None = None,
) -> EnginePlan:
    """The plan for ``config`` on ``device`` (resolved: cpu, cuda, cuda:N) with ``model``.

    ``available`` (bytes) defaults to the machine's; tests pass their own.
    ``num_staging_blocks`` overrides the staging ring's width (a ``ModelRunner`` built directly
    with its own ring: the device budget makes room for that one)."""
    device_type = device.split(":", 1)[0]
    check_tensor_parallel(config, model, device)
    dtype = dtype_name(config.dtype, model.dtype, device_type)
    size = config.tensor_parallel_size
    block_bytes = kv_block_bytes(model, config.block_size, dtype, size)
    host = plan_host(config, block_bytes, pinned=device_type == "cuda", available=available)
    staging = host.num_staging_blocks if num_staging_blocks is None else num_staging_blocks
    # The device budget is each rank's, for its slice of every block.
    num_device_blocks = device_blocks(config, model, device_type, block_bytes // size, staging)
    max_model_len = plan_max_model_len(config, model, num_device_blocks, host)
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
        # Without chunking a prompt (or a preempted request's recomputation) must fit one step.
        raise ConfigError(
            f"--max-num-batched-tokens ({config.max_num_batched_tokens}) must be at least the model length "
            f"({max_model_len}) when chunked prefill is off; raise it, lower --max-model-len, or drop "
            "--no-enable-chunked-prefill."
        )
    return EnginePlan(
        model_path=str(Path(config.resolved_model()).absolute()),
        device=device,
        dtype=dtype,
        max_model_len=max_model_len,
        num_device_blocks=num_device_blocks,
        host=host,
        num_layers=model.num_layers,
        num_kv_heads=num_stored_kv_heads(model, size),
        head_dim=model.head_dim,
    )


def device_blocks(
    config: EngineConfig, model: ModelConfig, device_type: str, block_bytes: int, num_staging_blocks: int
) -> int | None:
    """``--device-kv-blocks``, else what fits in ``--device-kv-gib``, else 1 GiB on CPU, less the
    staging ring; None on CUDA without either (the executor sizes it from the memory free after
    loading the weights)."""
    if config.device_kv_blocks is not None:
        return config.device_kv_blocks
    if config.device_kv_gib is not None:
        budget, source = config.device_kv_gib * GIB, f"--device-kv-gib {config.device_kv_gib:g}"
    elif device_type == "cpu":
        budget, source = DEFAULT_CPU_KV_GIB * GIB, f"the default {DEFAULT_CPU_KV_GIB:g} GiB of KV on CPU"
    else:
        return None
    page_bytes = block_bytes // model.num_layers
    staging_bytes = num_staging_areas(config, model) * num_staging_blocks * page_bytes
    num_blocks = int((budget - staging_bytes) // block_bytes)
    if num_blocks < 1:
        staging = f" after {staging_bytes / GIB:.3f} GiB of staging pages" if staging_bytes else ""
        raise ConfigError(
            f"{source} holds no KV block ({block_bytes} bytes each{staging}); raise it or set --device-kv-blocks."
        )
    return num_blocks


def plan_max_model_len(
    config: EngineConfig, model: ModelConfig, num_device_blocks: int | None, host: HostPlan
) -> int:
    """``--max-model-len`` checked against the model and the KV pool; without it, the model's
    ``max_position_embeddings``, lowered to what the pool holds (device blocks, plus the largest
    lease under pie) so that one sequence of the model length always fits."""
    limit = model.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ConfigError(
            f"--max-model-len {config.max_model_len} is above the model's max_position_embeddings ({limit}, "
            f"in {Path(model.path) / 'config.json'}); give at most {limit}."
        )
    wanted = config.max_model_len or limit
    if num_device_blocks is None:
        return wanted  # the executor checks the pool once it has sized it
    pool_blocks = num_device_blocks + (host.max_host_blocks if config.kv_policy == "pie" else 0)
    pool_tokens = pool_blocks * config.block_size
    if wanted <= pool_tokens:
        return wanted
    if config.max_model_len is None:
        return pool_tokens
    pool = "device and host KV pools hold" if config.kv_policy == "pie" else "device KV pool holds"
    raise ConfigError(
        f"--max-model-len {wanted} does not fit: the {pool} {pool_blocks} blocks of {config.block_size} "
        f"tokens ({pool_tokens} tokens); raise --device-kv-blocks/--device-kv-gib (one sequence needs "
        f"{-(-wanted // config.block_size)} blocks) or lower --max-model-len."
    )


def plan_of(config: EngineConfig, num_staging_blocks: int | None = None) -> EnginePlan:
    """``config.plan``, or (for a config that never went through the daemon's preflight, such as a
    ``ModelRunner`` built directly) the same plan derived here from the model folder."""
    if config.plan is not None:
        return config.plan
    model = ModelConfig.from_folder(config.resolved_model())
    return plan_engine(config, model, local_device(config.device), num_staging_blocks=num_staging_blocks)


def local_device(device: str) -> str:
    """``--device auto`` resolved in a process that may load torch (``$PIED_DEVICE`` first)."""
    if device != "auto":
        return device
    forced = os.environ.get("PIED_DEVICE")
    if forced:
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
