"""Load a model folder's safetensors weights into the model's parameters.

The model says where every checkpoint tensor goes (``checkpoint_targets``: name -> destination
view, which may be a row slice of a fused parameter). This module finds the files (one
``model.safetensors`` or the shards named by ``model.safetensors.index.json``), checks that every
tensor is present with the expected shape, and copies it in, converting dtype and device on the
way. Every failure is a ``ModelFolderError`` naming the file at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

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


def load_weights(targets: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy each checkpoint tensor named in ``targets`` into its destination view.

    Tensors in the files that no target names (e.g. a tied ``lm_head.weight``) are ignored.
    """
    files = weight_files(folder)
    where = _tensor_locations(files)
    missing = [name for name in targets if name not in where]
    if missing:
        shown = ", ".join(missing[:MAX_NAMES_IN_ERROR])
        more = f" and {len(missing) - MAX_NAMES_IN_ERROR} more" if len(missing) > MAX_NAMES_IN_ERROR else ""
        described = files[0] if len(files) == 1 else folder / WEIGHTS_INDEX_FILE
        raise ModelFolderError(f"{described}: missing tensors {shown}{more}.")
    with Progress(len(targets), f"loading {folder.name}") as progress:
        for file in files:
            _load_file(file, [name for name in targets if where[name] == file], targets, progress)


def _load_file(file: Path, names: list[str], targets: dict[str, torch.Tensor], progress: Progress) -> None:
    try:
        with safe_open(file, framework="pt", device="cpu") as handle, torch.no_grad():
            for name in names:
                destination = targets[name]
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != tuple(destination.shape):
                    raise ModelFolderError(
                        f"{file}: tensor {name} has shape {list(shape)}, but config.json implies "
                        f"{list(destination.shape)}."
                    )
                destination.copy_(handle.get_tensor(name))
                progress.update()
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
