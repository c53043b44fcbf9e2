"""Tensor parallelism (DESIGN.md "Parallelism"): the process group, the shard each rank holds and the
collectives of the Megatron-style layers.

One executor process per rank, joined by ``torch.distributed`` (nccl on CUDA, gloo on CPU). The
supervisor starts them with torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), read once here, at start. Every rank runs the same model code on
its shard:

- column-parallel ``qkv_proj`` and ``gate_up_proj`` (each rank its heads' and its intermediate
  slice's rows), row-parallel ``o_proj`` and ``down_proj`` (the matching columns, then one
  all-reduce each);
- KV heads split across ranks, or replicated when there are fewer KV heads than ranks (each rank
  then holds the one KV head its query heads read);
- vocabulary-parallel embedding (each rank looks up its rows, an all-reduce sums them) and LM head
  (each rank's logits columns are gathered to rank 0, which alone samples: the other ranks keep no
  sampling state and return no tokens).

A layer's checkpoint tensors are described by :class:`ShardedTarget`: which rows (or columns) of
the full tensor land in which destination view, so each rank reads only its slices
(``safe_open(...).get_slice``) and no rank materialises the full model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits for the others at the rendezvous; loading is what takes long, and it comes after.
INIT_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among ``size`` ranks (``size == 1``: no process group, no collective)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_first(self) -> bool:
        """Rank 0: the rank that samples and answers the scheduler."""
        return self.rank == 0

    def split(self, total: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``total`` items split evenly (the preflight checked that
        ``size`` divides it)."""
        if total % self.size:
            raise ValueError(f"{total} does not split over {self.size} tensor-parallel ranks.")
        part = total // self.size
        return self.rank * part, (self.rank + 1) * part

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of the KV heads. With fewer KV heads than ranks each rank
        holds one, the one its query heads read (replicated on ``size / num_kv_heads`` ranks)."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads)
        query_start, _ = self.split(num_heads)
        head = query_start // (num_heads // num_kv_heads)
        return head, head + 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (row-parallel outputs, vocabulary-parallel embeddings)."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[rows, columns]`` from every rank concatenated along the columns, on rank 0; the other
        ranks get their own part back (they do not sample)."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.is_first else None
        dist.gather(tensor, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else tensor

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` of any rank (every rank must size its KV pool alike)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())


SINGLE = TensorParallel()


def init_tensor_parallel(size: int, init_method: str, device_type: str) -> TensorParallel:
    """Join the process group of ``size`` ranks (a no-op for one), from torchrun's variables.

    ``init_method``: ``env://`` (``MASTER_ADDR``/``MASTER_PORT``) or ``tcp://host:port``.
    """
    if size == 1:
        return SINGLE
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as error:
        raise RuntimeError(
            f"tensor parallelism needs RANK and WORLD_SIZE in the environment (the supervisor sets them): {error!r}"
        ) from None
    if world_size != size:
        raise RuntimeError(f"WORLD_SIZE is {world_size}, but --tensor-parallel-size is {size}.")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=INIT_TIMEOUT)
    if device_type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        # The ranks share the machine's cores: without this each would start a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    return TensorParallel(rank, size, local_rank)


def close_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ShardedTarget:
    """Where one checkpoint tensor goes on this rank: ``pieces`` of ``(destination, start, stop)``,
    each the range ``[start, stop)`` of the full tensor along ``dim`` copied into ``destination``
    (a view of a parameter). ``full_shape`` is the checkpoint tensor's shape (checked before reading).
    Fused checkpoints (Phi-3's ``qkv_proj``) give several pieces of one tensor."""

    full_shape: tuple[int, ...]
    dim: int
    pieces: tuple[tuple[torch.Tensor, int, int], ...]

    @property
    def covers_all(self) -> bool:
        return len(self.pieces) == 1 and self.pieces[0][1:] == (0, self.full_shape[self.dim])

    def read(self, sliced: object) -> list[torch.Tensor]:
        """Each piece's data, read through a safetensors ``get_slice`` handle (nothing else is read)."""
        index = (slice(None),) * self.dim
        return [sliced[index + (slice(start, stop),)] for _, start, stop in self.pieces]  # type: ignore[index]
