"""``--generation-config auto|vllm|FOLDER``: a model's own sampling defaults, as vLLM applies them.

``auto`` (the default, as in vLLM) reads the model folder's ``generation_config.json``; ``FOLDER``
reads that folder's; ``vllm`` reads none. Its ``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty`` and ``max_new_tokens`` become the defaults of every request (a request's own
value wins; ``max_new_tokens`` is the default ``max_tokens``, bounded by what is left of the context).
As in vLLM (``to_diff_dict``), a value equal to transformers' own default is not a default here:
``top_k: 50`` is transformers' default, not the model's choice. Keys absent from the file, and the
rest of its keys, change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

import proto
from proto.config import ConfigError
from workers.model_config import read_json_object

FILE_NAME = "generation_config.json"
# generation_config.json key -> the request field it is the default of.
KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
# transformers' GenerationConfig defaults: a file holding one of them did not choose it.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}

T = TypeVar("T")


@dataclass(frozen=True)
class GenerationDefaults:
    """Request defaults: request field name -> value (``max_tokens`` for ``max_new_tokens``)."""

    values: dict[str, float | int] = field(default_factory=dict)
    source: Path | None = None  # the file they came from

    def apply(self, request: T) -> T:
        """``request`` (a msgspec Struct) with each default set where the request left it unset
        (``max_tokens`` is :meth:`max_tokens`' to resolve: it depends on the prompt)."""
        missing = {
            name: value
            for name, value in self.values.items()
            if name != "max_tokens" and getattr(request, name, None) is None
        }
        return msgspec.structs.replace(request, **missing) if missing else request  # type: ignore[type-var]

    def max_tokens(self, requested: int | None, num_prompt_tokens: int, max_model_len: int) -> int | None:
        """``requested``, else the default ``max_new_tokens`` bounded by the context left (vLLM's
        ``min(max_model_len - prompt, max_new_tokens)``); None when neither applies."""
        default = self.values.get("max_tokens")
        if requested is not None or default is None:
            return requested
        rest = max_model_len - num_prompt_tokens
        return min(int(default), rest) if rest > 0 else None


def load_generation_defaults(option: str, model_dir: Path) -> GenerationDefaults:
    """The defaults ``--generation-config option`` means for the model in ``model_dir``; a
    ConfigError (or ModelFolderError) naming the flag or file when they cannot be used."""
    if option == "vllm":
        return GenerationDefaults()
    if option == "auto":
        file = model_dir / FILE_NAME
        if not file.is_file():
            return GenerationDefaults()
    else:
        folder = Path(option).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"--generation-config {option!r} is not a folder; use auto, vllm or a folder holding {FILE_NAME}."
            )
        file = folder / FILE_NAME
        if not file.is_file():
            raise ConfigError(f"--generation-config {option}: the folder has no {FILE_NAME}.")
    raw = read_json_object(file)
    values: dict[str, float | int] = {}
    for key, name in KEYS.items():
        value = raw.get(key)
        if value is None or (key in TRANSFORMERS_DEFAULTS and value == TRANSFORMERS_DEFAULTS[key]):
            continue
        integer = name in ("top_k", "max_tokens")
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise ConfigError(f"{file}: {key} must be {'an integer' if integer else 'a number'}, got {value!r}.")
        values[name] = value if integer else float(value)
    try:
        proto.SamplingParams(**values).validate()
    except ValueError as error:
        param = getattr(error, "param", "")
        key = next((k for k, name in KEYS.items() if name == param), param)
        raise ConfigError(f"{file}: {key}: {error}") from None
    return GenerationDefaults(values, file)
