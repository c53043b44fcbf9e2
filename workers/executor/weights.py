"""Load a model folder's safetensors weights into the model's parameters.

The model says where every checkpoint tensor goes (``checkpoint_targets``: name -> destination
view, which may be a row slice of a fused parameter). This module finds the files (one
``model.safetensors`` or the shards named by ``model.safetensors.index.json``), checks that every
tensor is present with the expected shape, and copies it in, converting dtype and device on the
way. Every failure is a ``ModelFolderError`` naming the file at fault.

Under tensor parallelism a target is a :class:`~workers.executor.parallel.ShardedTarget`: the rank's
slices are read through ``get_slice``, so a rank reads its shard and never the whole tensor.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from workers.executor.parallel import ShardedTarget
from workers.model_config import SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE, ModelFolderError
from workers.progress import Progress

MAX_NAMES_IN_ERROR = 8


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a folder's weights; the index, when present, decides."""
    index_file = folder / WEIGHTS_INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ModelFolderError(
                f"{index_file}: not a valid safetensors index (needs a 'weight_map' object): {error!r}."
            ) from None
        shards = [folder / name for name in shard_names]
        for shard in shards:
            if not shard.is_file():
                raise ModelFolderError(f"{index_file}: refers to shard {shard.name!r}, which does not exist.")
        return shards
    single = folder / SINGLE_WEIGHTS_FILE
    if single.is_file():
        return [single]
    raise ModelFolderError(
        f"{folder}: no weights found; expected {SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}."
    )


def load_weights(
    targets: dict[str, torch.Tensor | ShardedTarget],
    folder: Path,
    fp8_block_size: tuple[int, int] | None = None,
) -> int:
    """Copy each checkpoint tensor named in ``targets`` into its destination view (or, for a
    ``ShardedTarget``, each of its slices into its piece); returns the bytes read from the files.

    Tensors in the files that no target names (e.g. a tied ``lm_head.weight``) are ignored. With
    ``fp8_block_size`` (an FP8 checkpoint, see ``ModelConfig``), a float8 weight is dequantized with
    its ``weight_scale_inv`` on the way (whole tensors only: the preflight refuses FP8 with tensor
    parallelism).
    """
    files = weight_files(folder)
    where = _tensor_locations(files)
    missing = [name for name in targets if name not in where]
    if missing:
        shown = ", ".join(missing[:MAX_NAMES_IN_ERROR])
        more = f" and {len(missing) - MAX_NAMES_IN_ERROR} more" if len(missing) > MAX_NAMES_IN_ERROR else ""
        described = files[0] if len(files) == 1 else folder / WEIGHTS_INDEX_FILE
        raise ModelFolderError(f"{described}: missing tensors {shown}{more}.")
    with Progress(len(targets), f"loading {folder.name}") as progress, contextlib.ExitStack() as stack:
        try:
            handles = {
                file: stack.enter_context(safe_open(file, framework="pt", device="cpu")) for file in files
            }
        except Exception as error:  # checked by _tensor_locations already; a file changed under us
            raise ModelFolderError(f"{folder}: corrupt safetensors file ({error}).") from None
        bytes_read = 0
        for file in files:
            for name in [name for name in targets if where[name] == file]:
                target = targets[name]
                if isinstance(target, ShardedTarget) and not target.covers_all:
                    for (destination, _, _), piece in zip(target.pieces, _read_slices(handles[file], file, name, target)):
                        with torch.no_grad():
                            destination.copy_(piece)
                        bytes_read += piece.nbytes
                    progress.update()
                    continue
                if isinstance(target, ShardedTarget):
                    target = target.pieces[0][0]
                tensor = _read(handles, where, file, name, target.shape)
                bytes_read += tensor.nbytes
                if tensor.dtype in FP8_DTYPES:
                    scale_name = name + "_scale_inv"
                    if fp8_block_size is None or scale_name not in where:
                        raise ModelFolderError(
                            f"{file}: tensor {name} is FP8 but has no {scale_name} "
                            "(or config.json has no FP8 quantization_config)."
                        )
                    scale = _read(handles, where, where[scale_name], scale_name, None)
                    tensor = dequantize_fp8(tensor, scale, fp8_block_size, where[scale_name], name)
                with torch.no_grad():
                    target.copy_(tensor)
                progress.update()
    return bytes_read


FP8_DTYPES = (torch.float8_e4m3fn,)


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int], file: Path, name: str
) -> torch.Tensor:
    """``weight * scale_inv`` in float32, each scale covering a ``block_size`` tile of the weight (the
    last tiles may be partial), or the whole tensor when ``block_size`` is (0, 0) or there is one scale."""
    weight32 = weight.to(torch.float32)
    if scale_inv.numel() == 1:
        return weight32 * scale_inv.to(torch.float32).reshape(())
    rows, columns = weight.shape
    block_rows, block_columns = block_size
    expected = (-(-rows // block_rows), -(-columns // block_columns)) if block_rows else (1, 1)
    if tuple(scale_inv.shape) != expected:
        raise ModelFolderError(
            f"{file}: {name}_scale_inv has shape {list(scale_inv.shape)}, but a {rows}x{columns} weight in "
            f"blocks of {list(block_size)} needs {list(expected)}."
        )
    scale = scale_inv.to(torch.float32).repeat_interleave(block_rows, 0)[:rows]
    return weight32 * scale.repeat_interleave(block_columns, 1)[:, :columns]


def _read(
    handles: dict[Path, Any], where: dict[str, Path], file: Path, name: str, shape: torch.Size | None
) -> torch.Tensor:
    """One tensor from its file, its shape checked against ``shape`` (when given) before reading."""
    try:
        handle = handles[where[name]]
        found = tuple(handle.get_slice(name).get_shape())
        if shape is not None and found != tuple(shape):
            raise ModelFolderError(
                f"{file}: tensor {name} has shape {list(found)}, but config.json implies {list(shape)}."
            )
        return handle.get_tensor(name)
    except ModelFolderError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged data
        raise ModelFolderError(f"{file}: corrupt safetensors file ({error}).") from None


def _read_slices(handle: Any, file: Path, name: str, target: ShardedTarget) -> list[torch.Tensor]:
    """A sharded target's slices of one tensor, its full shape checked first."""
    try:
        sliced = handle.get_slice(name)
        found = tuple(sliced.get_shape())
        if found != target.full_shape:
            raise ModelFolderError(
                f"{file}: tensor {name} has shape {list(found)}, but config.json implies {list(target.full_shape)}."
            )
        if sliced.get_dtype().startswith("F8"):
            raise ModelFolderError(f"{file}: tensor {name} is FP8, which tensor parallelism does not load yet.")
        return target.read(sliced)
    except ModelFolderError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged data
        raise ModelFolderError(f"{file}: corrupt safetensors file ({error}).") from None


def _tensor_locations(files: list[Path]) -> dict[str, Path]:
    """Which file holds each tensor, read from the files' headers (the data is not touched)."""
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    where[name] = file
        except Exception as error:  # a damaged header, a truncated file, not safetensors at all
            raise ModelFolderError(f"{file}: corrupt safetensors file ({error}).") from None
    return where
