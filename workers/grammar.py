"""Structured output with xgrammar: a request's :class:`proto.GrammarConstraint` as a grammar, and
per request a matcher that yields the bitmask of the tokens the grammar allows next.

Why the grammar state lives in the executor: the matcher must advance by every sampled token
before the next step's mask exists, and the executor is where tokens are sampled and where each
request's sampling state already lives (from its first step to its end, preemption included). The
scheduler would otherwise have to ship a vocabulary-sized mask per request per step, and the
executor would wait for it. Every tensor-parallel rank runs the same matcher on the same tokens,
so their masks agree.

The frontend calls :func:`grammar_of` to check a constraint before it reaches the engine (a bad
schema is a 400 there, never an executor failure); the executor compiles it against the model's
vocabulary (from the folder's tokenizer.json), with xgrammar's cache for repeated grammars.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import proto

if TYPE_CHECKING:
    import xgrammar


def _xgrammar():
    """xgrammar, imported on first use: it takes seconds to import (it loads transformers), which
    a server or an executor that never sees a grammar should not pay at start."""
    import xgrammar

    return xgrammar


def grammar_of(constraint: proto.GrammarConstraint) -> xgrammar.Grammar:
    """The xgrammar grammar of ``constraint``; ``ValueError`` with xgrammar's reason if it is bad."""
    xgr = _xgrammar()
    try:
        if constraint.kind == proto.GrammarKind.JSON_SCHEMA:
            if not constraint.spec:
                return xgr.Grammar.builtin_json_grammar()
            return xgr.Grammar.from_json_schema(constraint.spec, any_whitespace=False)
        if constraint.kind == proto.GrammarKind.REGEX:
            return xgr.Grammar.from_regex(constraint.spec)
        if constraint.kind == proto.GrammarKind.EBNF:
            return xgr.Grammar.from_ebnf(constraint.spec)
    except (RuntimeError, ValueError, TypeError) as error:  # xgrammar raises RuntimeError on parse errors
        raise ValueError(str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)) from None
    raise ValueError(f"unknown grammar kind {constraint.kind!r}.")


def choice_constraint(choices: list[str]) -> proto.GrammarConstraint:
    """Exactly one of ``choices`` (vLLM's ``choice``/``guided_choice``), as EBNF string literals."""
    if not choices:
        raise ValueError("choice must list at least one string.")
    # JSON string escapes are valid in xgrammar's EBNF literals.
    alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
    return proto.GrammarConstraint(proto.GrammarKind.EBNF, f"root ::= {alternatives}")


class GrammarCompiler:
    """Compiles constraints against one model's vocabulary; built on first use, so a model that is
    never asked for structured output never reads its tokenizer here."""

    def __init__(self, model_folder: Path, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.model_folder = model_folder
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None

    def _tokenizer_info(self) -> xgrammar.TokenizerInfo:
        from tokenizers import Tokenizer

        xgr = _xgrammar()
        path = self.model_folder / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(path))
        # The embedding may have more rows than the tokenizer has tokens: those stay "" (never allowed).
        encoded_vocab = [""] * self.vocab_size
        for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
            if token_id < self.vocab_size:
                encoded_vocab[token_id] = token
        metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
        return xgr.TokenizerInfo(
            encoded_vocab,
            vocab_type=metadata["vocab_type"],
            vocab_size=self.vocab_size,
            stop_token_ids=self.eos_token_ids,
            add_prefix_space=metadata["add_prefix_space"],
        )

    def matcher(self, constraint: proto.GrammarConstraint) -> xgrammar.GrammarMatcher:
        xgr = _xgrammar()
        if self._compiler is None:
            self._compiler = xgr.GrammarCompiler(self._tokenizer_info(), max_threads=1)
        compiled = self._compiler.compile_grammar(grammar_of(constraint))
        return xgr.GrammarMatcher(compiled)


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 ``[num_rows, ceil(vocab / 32)]`` bitmask, all tokens allowed."""
    return _xgrammar().allocate_token_bitmask(num_rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in ``rows`` only, the logits whose bit is 0 (``bitmask`` rows align with ``logits``)."""
    xgr = _xgrammar()
    if logits.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
    else:
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=logits.shape[1], indices=rows
        )
