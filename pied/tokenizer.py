"""A Hugging Face tokenizer folder read with the ``tokenizers`` library (no transformers needed).

Reads ``tokenizer.json`` (the tokenizer itself) and ``tokenizer_config.json`` (special tokens,
``add_bos_token``, ``add_eos_token``, ``model_max_length`` and the chat template); a
``chat_template.jinja`` or ``chat_template.json`` next to them takes priority over the config's
template, as in transformers.

BOS rule: ``tokenizer.json``'s post-processor decides first; when it adds no BOS and the config says
``add_bos_token``, :meth:`Tokenizer.encode` prepends one, unless the text already produced it (so
never two). transformers 4 honoured ``add_bos_token`` this way; transformers 5 ignores the flag
whenever a ``tokenizer.json`` exists, so the two differ exactly for folders whose post-processor
lacks the BOS their config asks for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from pied.chat_template import ChatTemplateError, load_chat_template, render_chat_template

# transformers writes int(1e30) for "no limit"; anything this large means the same.
_UNLIMITED_LENGTH = 10**12

_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used; the message names the file and what is wrong."""


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


class Tokenizer:
    """Encode, decode and apply the chat template for one model folder.

    ``chat_template`` overrides the folder's template (the text of a template; see
    :func:`pied.chat_template.load_chat_template` for ``--chat-template FILE``).
    """

    def __init__(self, folder: str | Path, chat_template: str | None = None) -> None:
        self.folder = Path(folder)
        tokenizer_file = self.folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            hint = ""
            if (self.folder / "tokenizer.model").is_file():
                hint = " (only a SentencePiece tokenizer.model is there; save the tokenizer with transformers to get one)"
            raise TokenizerError(f"{tokenizer_file} does not exist{hint}.")
        try:
            self._backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust side raises a bare Exception for any parse error
            raise TokenizerError(f"{tokenizer_file} is not a valid tokenizer: {error}") from None
        # Prompt length is the engine's business; a tokenizer.json may carry training-time settings.
        self._backend.no_truncation()
        self._backend.no_padding()

        config_file = self.folder / "tokenizer_config.json"
        config = _read_json_object(config_file) if config_file.is_file() else {}
        self.config = config

        self.special_tokens: dict[str, str] = {}
        for name in _NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra_tokens = [
            token for token in map(_token_content, extra if isinstance(extra, list) else []) if token
        ]

        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self.pad_token_id = self._special_id("pad_token")
        self.unk_token_id = self._special_id("unk_token")

        special_ids = {
            self._backend.token_to_id(token) for token in [*self.special_tokens.values(), *extra_tokens]
        }
        special_ids |= {i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}
        special_ids.discard(None)
        self.all_special_ids: list[int] = sorted(special_ids)  # type: ignore[arg-type]

        # What the post-processor adds on its own decides whether add_bos_token/add_eos_token add more.
        added = self._backend.encode("", add_special_tokens=True).ids
        self._prepend_bos = (
            bool(config.get("add_bos_token", False))
            and self.bos_token_id is not None
            and self.bos_token_id not in added
        )
        self._append_eos = (
            bool(config.get("add_eos_token", False))
            and self.eos_token_id is not None
            and self.eos_token_id not in added
        )

        max_length = config.get("model_max_length")
        self.model_max_length: int | None = (
            int(max_length)
            if isinstance(max_length, (int, float)) and 0 < max_length < _UNLIMITED_LENGTH
            else None
        )

        self.chat_templates = self._load_chat_templates(config, config_file)
        if chat_template is not None:
            self.chat_templates["default"] = chat_template

    @classmethod
    def from_folder(cls, folder: str | Path, chat_template: str | None = None) -> Tokenizer:
        return cls(folder, chat_template)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    def _load_chat_templates(self, config: dict[str, Any], config_file: Path) -> dict[str, str]:
        """Named templates ("default", "tool_use", ...): a chat_template.jinja or .json file first,
        then tokenizer_config.json's ``chat_template`` (a string, or a list of {name, template})."""
        jinja_file = self.folder / "chat_template.jinja"
        json_file = self.folder / "chat_template.json"
        if jinja_file.is_file():
            try:
                return {"default": load_chat_template(jinja_file)}
            except ChatTemplateError as error:
                raise TokenizerError(str(error)) from None
        source, value = config_file, config.get("chat_template")
        if json_file.is_file():
            source, value = json_file, _read_json_object(json_file).get("chat_template")
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list) and all(
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)
            for entry in value
        ):
            return {entry["name"]: entry["template"] for entry in value}
        raise TokenizerError(
            f"{source}: chat_template must be a string or a list of {{name, template}} objects."
        )

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer knows, added tokens included (transformers' ``len(tokenizer)``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def max_token_id(self) -> int | None:
        """The largest id the tokenizer can produce (None for an empty vocabulary)."""
        return max(self._backend.get_vocab(with_added_tokens=True).values(), default=None)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> Any:
        """The token strings of ``ids`` (``None`` for an unknown id); one id gives one string."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> Any:
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(token) for token in tokens]

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. With ``add_special_tokens`` the post-processor's tokens are added,
        and a BOS when the config asks for it and there is none yet (see the module docstring).
        Rendered chat prompts are encoded with ``add_special_tokens=False``, as transformers and
        vLLM do: the template writes its own BOS."""
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._add_special(ids) if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` of each text, in parallel. NOTE: unlike ``encode``, the Rust side
        releases the GIL here, so a call on a worker thread does not stall the event loop."""
        encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        if not add_special_tokens:
            return [encoding.ids for encoding in encodings]
        return [self._add_special(encoding.ids) for encoding in encodings]

    def _add_special(self, ids: list[int]) -> list[int]:
        if self._prepend_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]
        if self._append_eos and (not ids or ids[-1] != self.eos_token_id):
            ids.append(self.eos_token_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or an integer array)."""
        if not isinstance(ids, list):
            ids = [int(i) for i in ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, sequences: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` of each id list. NOTE: releases the GIL (``decode`` holds it), so long
        decodes belong here when they run on a worker thread."""
        return self._backend.decode_batch(sequences, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """transformers' choice: a named template or a template given as text, else "tool_use" when
        there are tools and the folder has one, else "default"."""
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            names = ", ".join(sorted(self.chat_templates))
            raise ChatTemplateError(
                f"the model has named chat templates ({names}) but none called 'default'."
            )
        raise ChatTemplateError(
            f"the model at {self.folder} has no chat template; give one with --chat-template "
            "(in Python: LLM.chat(..., chat_template=TEXT))."
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        /,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for ``messages``. ``kwargs`` become template variables
        (``enable_thinking``, ...), as do the special tokens (``bos_token``, ``eos_token``, ...), as
        in transformers; ``chat_template`` picks a named template or gives one as text. Raises
        ChatTemplateError."""
        template = self.get_chat_template(chat_template, tools)
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            variables={**self.special_tokens, **kwargs},
        )
