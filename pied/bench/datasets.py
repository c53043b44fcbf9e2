"""Request streams for ``pied bench serve``: random, ShareGPT and shared-prefix multi-turn.

Every sampler is deterministic for a seed and returns :class:`SampleRequest` objects that carry a
prompt in both forms a server accepts: ``prompt`` for ``/v1/completions`` and ``messages`` for
``/v1/chat/completions``. The client sends whichever its endpoint takes.

Lengths. Without a tokenizer the client cannot know how a server tokenizes text, so:
- completions prompts of the random and prefix datasets are **token ids** (the server takes a list
  of ids as ``prompt``), drawn from ``[10, 500)`` by default: ids that every tokenizer of 500 or
  more tokens has, clear of the usual special tokens at the bottom — the prompt is exactly the
  requested number of tokens;
- chat prompts are **words**, one common English word per requested token (each is one token in
  the usual BPE vocabularies, so the length is close; the chat template adds its own tokens);
- ShareGPT lengths are estimated at four characters a token.
With ``--tokenizer`` (a local ``tokenizer.json`` or a model folder holding one) ids are drawn from
that tokenizer's ordinary tokens, texts are those ids decoded, and ShareGPT lengths are exact.
Whatever the sampler meant, the benchmark counts what the server reports in ``usage``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Common English words; each is a single token (with its leading space) in GPT-2, Llama and Qwen.
WORDS = tuple(
    dict.fromkeys(
        "the of and to in is was for on that with as by at from his an be this are or have which one had "
        "not but all were when there can more her been if has would who their will some other time into "
        "only new than them two may first any then these so like also most years over such after used "
        "many where through well world made city being both three while people during school could well "
        "under part known same found high life year should work system while name water long day state".split()
    )
)
DEFAULT_TOKEN_ID_RANGE = (10, 500)
SHAREGPT_CHARS_PER_TOKEN = 4
HUMAN_ROLES = ("human", "user")


@dataclass(frozen=True)
class SampleRequest:
    """One request of a stream: its prompt in both endpoint forms, the input length the sampler
    meant (exact for token ids, estimated for text without a tokenizer), and ``max_tokens``."""

    prompt: str | list[int]
    messages: list[dict[str, str]]
    prompt_len: int
    output_len: int


class Vocabulary:
    """Where prompt tokens come from: a local tokenizer's ordinary tokens, or the default id range
    and word list (see the module doc)."""

    def __init__(self, tokenizer_path: str | Path | None = None) -> None:
        self.tokenizer: Any = None
        if tokenizer_path is None:
            self.token_ids = np.arange(*DEFAULT_TOKEN_ID_RANGE)
            return
        from tokenizers import Tokenizer

        path = Path(tokenizer_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer: no tokenizer.json at {path}")
        self.tokenizer = Tokenizer.from_file(str(path))
        special = {token.content for token in self.tokenizer.get_added_tokens_decoder().values()}
        ordinary = [i for token, i in self.tokenizer.get_vocab().items() if token not in special]
        # Tokens that decode to clean text alone (no partial UTF-8, no control characters), so a
        # decoded prompt re-encodes to about as many tokens.
        self.token_ids = np.array(sorted(i for i in ordinary if _clean(self.tokenizer.decode([i]))))
        if len(self.token_ids) == 0:
            raise ValueError(f"--tokenizer: {path} has no ordinary tokens to build prompts from")

    def segment(self, rng: np.random.Generator, num_tokens: int) -> tuple[list[int], str]:
        """``num_tokens`` random token ids, and a text of about as many tokens."""
        ids = self.token_ids[rng.integers(0, len(self.token_ids), size=num_tokens)].tolist()
        if self.tokenizer is not None:
            return ids, self._text_of_length(rng, ids)
        words = rng.integers(0, len(WORDS), size=num_tokens)
        return ids, " ".join(WORDS[i] for i in words)

    def _text_of_length(self, rng: np.random.Generator, ids: list[int]) -> str:
        """Decoded ``ids``, adjusted (vLLM's way: re-encode, cut or extend, decode) until the text
        re-encodes to ``len(ids)`` tokens, as far as a few rounds get."""
        text = self.tokenizer.decode(ids)
        for _ in range(4):
            encoded = self.tokenizer.encode(text, add_special_tokens=False).ids
            missing = len(ids) - len(encoded)
            if missing == 0:
                break
            if missing < 0:
                encoded = encoded[: len(ids)]
            else:
                encoded += self.token_ids[rng.integers(0, len(self.token_ids), size=missing)].tolist()
            text = self.tokenizer.decode(encoded)
        return text

    def count(self, text: str) -> int:
        """Tokens in ``text``: exact with a tokenizer, else estimated from its characters."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return math.ceil(len(text) / SHAREGPT_CHARS_PER_TOKEN)


def _clean(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c in " \n\t" for c in text)


def length_range(mean: int, range_ratio: float, flag: str) -> tuple[int, int]:
    """vLLM's rule: lengths uniform in ``[mean * (1 - r), mean * (1 + r)]``, at least 1."""
    if mean < 1:
        raise ValueError(f"{flag} must be at least 1, got {mean}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    return max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio)))


def sample_random(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    vocabulary: Vocabulary | None = None,
) -> list[SampleRequest]:
    """Prompts of random tokens (or words) with lengths uniform around the means."""
    vocabulary = vocabulary or Vocabulary()
    rng = np.random.default_rng(seed)
    input_low, input_high = length_range(input_len, range_ratio, "--random-input-len")
    output_low, output_high = length_range(output_len, range_ratio, "--random-output-len")
    requests = []
    for _ in range(num_prompts):
        prompt_len = int(rng.integers(input_low, input_high + 1))
        ids, text = vocabulary.segment(rng, prompt_len)
        requests.append(
            SampleRequest(
                prompt=ids,
                messages=[{"role": "user", "content": text}],
                prompt_len=prompt_len,
                output_len=int(rng.integers(output_low, output_high + 1)),
            )
        )
    return requests


def sample_sharegpt(
    path: str | Path,
    num_prompts: int,
    output_len: int | None = None,
    seed: int = 0,
    vocabulary: Vocabulary | None = None,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[SampleRequest]:
    """ShareGPT conversations (``[{"conversations": [{"from": "human", "value": ...}, ...]}]``):
    the first human turn is the prompt and the turn after it sets ``max_tokens`` (unless
    ``output_len``). Like vLLM: shuffled by the seed; turns under 4 tokens, prompts over
    ``max_prompt_len`` and pairs over ``max_total_len`` are skipped; too few conversations repeat."""
    vocabulary = vocabulary or Vocabulary()
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    candidates = []
    for entry in data:
        pair = _first_exchange(entry)
        if pair is not None:
            candidates.append(pair)
    order = np.random.default_rng(seed).permutation(len(candidates))
    requests = []
    for index in order:
        prompt, reply = candidates[index]
        prompt_len = vocabulary.count(prompt)
        reply_len = output_len if output_len is not None else vocabulary.count(reply)
        if prompt_len < 4 or (output_len is None and reply_len < 4):
            continue
        if prompt_len > max_prompt_len or prompt_len + reply_len > max_total_len:
            continue
        requests.append(SampleRequest(prompt, [{"role": "user", "content": prompt}], prompt_len, reply_len))
    if not requests:
        raise ValueError(f"{path}: no conversation with a human turn and a reply of usable length")
    return [requests[i % len(requests)] for i in range(num_prompts)]


def _first_exchange(entry: Any) -> tuple[str, str] | None:
    turns = entry.get("conversations", entry.get("conversation")) if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    for first, second in zip(turns, turns[1:]):
        if not (isinstance(first, dict) and isinstance(second, dict)):
            return None
        if first.get("from") in HUMAN_ROLES and isinstance(first.get("value"), str):
            reply = second.get("value")
            return (first["value"], reply) if isinstance(reply, str) else None
    return None


def sample_prefix(
    num_prompts: int,
    system_len: int = 256,
    num_turns: int = 4,
    turn_len: int = 32,
    output_len: int = 32,
    seed: int = 0,
    vocabulary: Vocabulary | None = None,
) -> list[SampleRequest]:
    """Multi-turn conversations that all share one system prompt of ``system_len`` tokens.

    Turn ``t`` of a conversation sends the system prompt, the earlier turns (user turns of
    ``turn_len`` tokens, assistant replies of ``output_len`` tokens, fixed by the seed rather than
    taken from the server so the stream is reproducible) and a new user turn. Requests go turn by
    turn (every conversation's first turn, then every second turn, ...), so each request extends
    a prefix an earlier request computed: what a prefix cache is for.
    """
    for flag, value in (
        ("--prefix-system-len", system_len),
        ("--prefix-num-turns", num_turns),
        ("--prefix-turn-len", turn_len),
        ("--prefix-output-len", output_len),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    vocabulary = vocabulary or Vocabulary()
    rng = np.random.default_rng(seed)
    system_ids, system_text = vocabulary.segment(rng, system_len)
    num_conversations = math.ceil(num_prompts / num_turns)
    conversations = []
    for _ in range(num_conversations):
        turns = []
        for _ in range(num_turns):
            turns.append((vocabulary.segment(rng, turn_len), vocabulary.segment(rng, output_len)))
        conversations.append(turns)
    requests = []
    for turn in range(num_turns):
        for turns in conversations:
            ids = list(system_ids)
            messages = [{"role": "system", "content": system_text}]
            for (user_ids, user_text), (reply_ids, reply_text) in turns[:turn]:
                ids += user_ids + reply_ids
                messages += [
                    {"role": "user", "content": user_text},
                    {"role": "assistant", "content": reply_text},
                ]
            (user_ids, user_text), _ = turns[turn]
            ids += user_ids
            messages.append({"role": "user", "content": user_text})
            requests.append(SampleRequest(ids, messages, len(ids), output_len))
    return requests[:num_prompts]
