"""pied: an LLM inference daemon that pools host memory behind the accelerator's KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proto import SamplingParams
from workers import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from pied.llm import LLM


def __getattr__(name: str):
    # LLM pulls in torch; `pied --help` and the API frontend should not pay for that.
    if name == "LLM":
        from pied.llm import LLM

        return LLM
    raise AttributeError(name)
