"""The model folder, checked by the daemon before any worker starts (part of ``pied.preflight``).

What a worker would otherwise find only after it started: ``config.json`` present, valid JSON, with
fields of the right types that agree with each other (``hidden_size`` a multiple of
``num_attention_heads`` when there is no ``head_dim``, heads a multiple of KV heads, an architecture
and a dtype pied runs); safetensors weights present, and every shard that
``model.safetensors.index.json`` names inside the folder (no ``..``, no absolute path, no symlink
out of it), existing, with a readable safetensors header, and every tensor the architecture
needs named in those headers (``ModelConfig.checkpoint_tensor_names``); a tokenizer whose largest
token id is below the model's ``vocab_size``. Every refusal is a ``ModelFolderError`` naming the file.

A model id (``org/name``) that is not a folder is looked up in the local Hugging Face cache, as
``huggingface_hub`` lays it out and finds it (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, ...): its
``refs/main`` snapshot is the folder. Nothing is ever downloaded (:func:`resolve_model_folder`).

Symlinks: a Hugging Face cache snapshot (``.../snapshots/<rev>/``) links each file to
``../../blobs/<hash>``; targets in that repository's ``blobs`` folder count as inside.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path, PurePosixPath
from typing import Any

from workers.model_config import (
    DTYPE_ALIASES,
    SINGLE_WEIGHTS_FILE,
    SUPPORTED_ARCHITECTURES,
    WEIGHTS_INDEX_FILE,
    ModelConfig,
    ModelFolderError,
    read_json_object,
)

# config.json keys and what they must hold. Keys not listed are left to the model's own parser.
POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "sliding_window", "original_max_position_embeddings")
OPTIONAL_NUMBERS = ("rms_norm_eps", "rope_theta")
OPTIONAL_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
OPTIONAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
MAX_NAMES_SHOWN = 8  # missing tensors named in an error


# What the Hub accepts as a repository id: ``name`` or ``org/name`` (letters, digits, ``-_.``).
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def hub_cache_dir() -> Path:
    """The Hugging Face cache by huggingface_hub's own rules, read now (not at its import):
    ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def resolve_model_folder(model: str) -> Path:
    """``model`` as a folder: itself when it exists (or cannot be a model id), else the snapshot
    of the model id ``org/name`` in the local Hugging Face cache (``refs/main``). Never downloads
    (``local_files_only``); an id not in the cache is a ModelFolderError naming the cache searched."""
    path = Path(model).expanduser()
    if path.exists() or not HUB_REPO_ID.fullmatch(model) or model.endswith((".", "..")):
        return path
    cache = hub_cache_dir()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError) as error:  # LocalEntryNotFoundError (an OSError), a bad id
        incomplete = "incomplete" in str(error)
        what = "an incomplete snapshot of it" if incomplete else f"no snapshot of {model}"
        raise ModelFolderError(
            f"--model {model}: no such folder, and {what} in the Hugging Face cache {cache} "
            "(HF_HUB_CACHE / HF_HOME); pied never downloads: fetch it first "
            f"(`hf download {model}`) or give the model's folder."
        ) from None


def check_model_folder(path: str | Path) -> ModelConfig:
    """Check the folder as a whole; its ModelConfig when it can be served."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder does not exist (or is not a directory); check --model.")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"{config_file}: not found; a Hugging Face model folder needs config.json.")
    raw = read_json_object(config_file)
    # A multimodal folder keeps the language model's fields in text_config.
    text_config = raw.get("text_config")
    if isinstance(text_config, dict) and "hidden_size" not in raw:
        raw = {**text_config, "architectures": raw.get("architectures")}
    check_config_fields(raw, config_file)
    model = ModelConfig.from_folder(folder)  # the architecture's own checks (rope, activation, ...)
    shards = weight_files(folder)
    present: set[str] = set()
    for shard in shards:
        present |= check_safetensors_header(shard)
    missing = sorted(model.checkpoint_tensor_names() - present)
    if missing:
        where = shards[0] if len(shards) == 1 else folder / WEIGHTS_INDEX_FILE
        shown = ", ".join(missing[:MAX_NAMES_SHOWN]) + (
            f" and {len(missing) - MAX_NAMES_SHOWN} more" if len(missing) > MAX_NAMES_SHOWN else ""
        )
        raise ModelFolderError(f"{where}: missing tensors {shown} (a {model.architecture} checkpoint has them).")
    return model


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config_fields(raw: dict[str, Any], file: Path) -> None:
    """Types and consistency of the fields every architecture uses."""

    def wrong(key: str, expected: str) -> ModelFolderError:
        return ModelFolderError(f"{file}: '{key}' must be {expected}, got {raw[key]!r}.")

    # First: an unsupported architecture is the answer, not one of its fields we would misread.
    architectures = raw.get("architectures")
    if architectures is not None:
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise wrong("architectures", "a list of class names")
        if architectures and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            raise ModelFolderError(
                f"{file}: architecture {', '.join(architectures)} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}."
            )
    for key in POSITIVE_INTS:
        if key not in raw:
            raise ModelFolderError(f"{file}: '{key}' is missing; it must be a positive integer.")
        if not _is_int(raw[key]) or raw[key] < 1:
            raise wrong(key, "a positive integer")
    for key in OPTIONAL_POSITIVE_INTS:
        if key == "sliding_window" and _is_int(raw.get(key)) and raw[key] == 0 and raw.get("use_sliding_window") is False:
            continue  # transformers 5 saves Qwen2's unused window as 0
        if raw.get(key) is not None and (not _is_int(raw[key]) or raw[key] < 1):
            raise wrong(key, "a positive integer or null")
    for key in OPTIONAL_NUMBERS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise wrong(key, "a positive number")
    for key in OPTIONAL_BOOLS:
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            raise wrong(key, "true or false")
    for key in OPTIONAL_TOKEN_IDS:
        value = raw.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
            raise wrong(key, "a token id, a list of token ids or null")

    num_heads = raw["num_attention_heads"]
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    if raw.get("head_dim") is None and raw["hidden_size"] % num_heads:
        raise ModelFolderError(
            f"{file}: hidden_size ({raw['hidden_size']}) must be a multiple of num_attention_heads ({num_heads}) "
            "when there is no head_dim."
        )
    if num_heads % num_kv_heads:
        raise ModelFolderError(
            f"{file}: num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})."
        )

    for key in ("torch_dtype", "dtype"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or value.removeprefix("torch.") not in DTYPE_ALIASES:
            raise ModelFolderError(
                f"{file}: {key} {value!r} is not supported; use float32, bfloat16 or float16."
            )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder, each checked to stay inside it and to exist."""
    index_file = folder / WEIGHTS_INDEX_FILE
    if not index_file.is_file():
        single = folder / SINGLE_WEIGHTS_FILE
        if not single.is_file():
            raise ModelFolderError(
                f"{folder}: no weights found; expected {SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} with its shards."
            )
        check_inside(folder, single, single)
        return [single]
    index = read_json_object(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFolderError(f"{index_file}: needs a non-empty 'weight_map' object (tensor name -> shard file).")
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ModelFolderError(f"{index_file}: the shard of {tensor!r} must be a file name, got {name!r}.")
        names.add(name)
    shards = []
    for name in sorted(names):
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise ModelFolderError(
                f"{index_file}: shard path {name!r} leaves the model folder; shards must be plain file names in it."
            )
        shard = folder / name
        check_inside(folder, shard, index_file)
        if not shard.is_file():
            raise ModelFolderError(f"{index_file}: names shard {name!r}, which does not exist in {folder}.")
        shards.append(shard)
    return shards


def check_inside(folder: Path, file: Path, named_by: Path) -> None:
    """``file`` (after symlinks) is in ``folder``, or in the blobs of the Hugging Face cache
    repository whose snapshot ``folder`` is."""
    target = file.resolve()
    roots = [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":
        roots.append(folder.resolve().parent.parent / "blobs")
    if not any(target == root or root in target.parents for root in roots):
        raise ModelFolderError(
            f"{named_by}: {file.name} links to {target}, outside the model folder; copy the file into the folder."
        )


def check_safetensors_header(file: Path) -> set[str]:
    """The 8-byte length and JSON header of a safetensors file (its data is not read); the names of
    the tensors it holds."""
    try:
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelFolderError(f"{file}: not a safetensors file (shorter than its 8-byte header length).")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ModelFolderError(f"{file}: not a safetensors file (header length {length}).")
            header = handle.read(length)
    except OSError as error:
        raise ModelFolderError(f"{file}: cannot be read ({error.strerror}).") from None
    try:
        parsed = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = None
    if len(header) < length or not isinstance(parsed, dict):
        raise ModelFolderError(f"{file}: corrupt safetensors header (truncated or not JSON).")
    return set(parsed) - {"__metadata__"}


def check_tokenizer_vocabulary(max_token_id: int | None, model: ModelConfig, folder: Path) -> None:
    """Every id the tokenizer can produce has a row in the model's embedding."""
    if max_token_id is not None and max_token_id >= model.vocab_size:
        raise ModelFolderError(
            f"{folder / 'tokenizer.json'}: the tokenizer has token id {max_token_id}, but config.json's vocab_size "
            f"is {model.vocab_size}; the tokenizer does not belong to this model."
        )
