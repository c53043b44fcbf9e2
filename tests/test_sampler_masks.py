"""The sampler's masks (allowed_token_ids, bad_words, grammars) against plain references: a masked
token is never sampled, whatever the logits, and unmasked rows are untouched."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import proto
from tests.tiny_models import EOS, tokenizer_json
from workers.executor.sampler import Sampler, SamplingState
from workers.grammar import GrammarCompiler, choice_constraint, grammar_of

VOCAB = 300
DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def compiler(tmp_path_factory) -> GrammarCompiler:
    folder = tmp_path_factory.mktemp("tok")
    (folder / "tokenizer.json").write_text(tokenizer_json(VOCAB))
    # A model vocabulary larger than the tokenizer's: the extra rows must never be allowed.
    return GrammarCompiler(folder, VOCAB + 20, {EOS})


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json(VOCAB))


def state(vocab: int = VOCAB, compiler: GrammarCompiler | None = None, **params) -> SamplingState:
    return SamplingState(proto.SamplingParams(**params), np.array([5, 6], dtype=np.int32), vocab, {EOS}, DEVICE, compiler)


def logits_row(vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * 5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_token_ids_only(temperature):
    sampler = Sampler(VOCAB, DEVICE)
    allowed = {7, 11, 250}
    for seed in range(40):
        states = [state(temperature=temperature, allowed_token_ids=sorted(allowed)), state(temperature=0.0)]
        logits = torch.cat([logits_row(VOCAB, seed), logits_row(VOCAB, seed + 1000)])
        ids, _ = sampler.sample(logits, states)
        assert int(ids[0]) in allowed
        # The reference for greedy: argmax over the allowed ids; the other row is untouched.
        if temperature == 0.0:
            assert int(ids[0]) == max(allowed, key=lambda t: float(logits[0, t]))
        assert int(ids[1]) == int(logits[1].argmax())


def test_bad_words_ban_the_last_token_after_the_prefix():
    sampler = Sampler(VOCAB, DEVICE)
    logits = torch.zeros(1, VOCAB)
    logits[0, 9] = 10.0  # the favourite
    logits[0, 8] = 5.0  # second best
    single = state(temperature=0.0, bad_words_token_ids=[[9]])
    ids, _ = sampler.sample(logits, [single])
    assert int(ids[0]) == 8
    # [3, 9]: 9 is banned only right after 3 (vLLM's rule over the output tokens).
    pair = state(temperature=0.0, bad_words_token_ids=[[3, 9]])
    assert int(sampler.sample(logits, [pair])[0][0]) == 9
    pair.append(3)
    assert int(sampler.sample(logits, [pair])[0][0]) == 8
    pair.append(8)
    assert int(sampler.sample(logits, [pair])[0][0]) == 9


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != EOS], skip_special_tokens=False)


def generate(sampler: Sampler, s: SamplingState, seed: int, steps: int = 60) -> list[int]:
    """Sample from random logits until eos; the grammar must end the output with eos."""
    generator = torch.Generator().manual_seed(seed)
    vocab = sampler.vocab_size
    for _ in range(steps):
        logits = torch.randn(1, vocab, generator=generator) * 4
        token = int(sampler.sample(logits, [s])[0][0])
        s.append(token)
        if token == EOS:
            break
    return s.output_token_ids


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_is_valid_whatever_the_logits(compiler, tokenizer, temperature):
    jsonschema = pytest.importorskip("jsonschema")
    sampler = Sampler(VOCAB + 20, DEVICE)
    constraint = proto.GrammarConstraint(proto.GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    for seed in range(4):
        s = state(VOCAB + 20, compiler, temperature=temperature, grammar=constraint)
        ids = generate(sampler, s, seed, steps=200)
        assert ids[-1] == EOS and all(t < VOCAB for t in ids)
        # strict=False: xgrammar's JSON strings admit raw control characters (e.g. \x1c), which
        # Python's strict parser refuses; the structure is what the grammar guarantees.
        jsonschema.validate(json.loads(decode(tokenizer, ids), strict=False), SCHEMA)


def test_regex_and_choice_and_ebnf(compiler, tokenizer):
    sampler = Sampler(VOCAB + 20, DEVICE)
    regex = proto.GrammarConstraint(proto.GrammarKind.REGEX, r"[a-c]{2,4}-\d")
    choice = choice_constraint(["yes", "no", 'say "hi"'])
    ebnf = proto.GrammarConstraint(proto.GrammarKind.EBNF, 'root ::= "(" [0-9]+ ")"')
    for seed in range(4):
        text = decode(tokenizer, generate(sampler, state(VOCAB + 20, compiler, grammar=regex), seed))
        assert re.fullmatch(r"[a-c]{2,4}-\d", text), text
        text = decode(tokenizer, generate(sampler, state(VOCAB + 20, compiler, grammar=choice), seed))
        assert text in ("yes", "no", 'say "hi"'), text
        text = decode(tokenizer, generate(sampler, state(VOCAB + 20, compiler, grammar=ebnf), seed))
        assert re.fullmatch(r"\(\d+\)", text), text


def test_grammar_rows_mix_with_free_rows(compiler, tokenizer):
    sampler = Sampler(VOCAB + 20, DEVICE)
    regex = proto.GrammarConstraint(proto.GrammarKind.REGEX, "z+")
    logits = logits_row(VOCAB + 20, 3).expand(3, -1).contiguous()
    greedy = dict(temperature=0.0)
    states = [state(VOCAB + 20, **greedy), state(VOCAB + 20, compiler, grammar=regex, **greedy), state(VOCAB + 20, **greedy)]
    ids, _ = sampler.sample(logits, states)
    reference = int(logits[0].argmax())
    assert int(ids[0]) == reference and int(ids[2]) == reference
    assert set(decode(tokenizer, [int(ids[1])])) == {"z"}


def test_bad_grammars_are_value_errors():
    for constraint in (
        proto.GrammarConstraint(proto.GrammarKind.JSON_SCHEMA, "{not json"),
        proto.GrammarConstraint(proto.GrammarKind.REGEX, "(unclosed"),
        proto.GrammarConstraint(proto.GrammarKind.EBNF, "root ::= undefined_rule"),
    ):
        with pytest.raises(ValueError):
            grammar_of(constraint)
    with pytest.raises(ValueError):
        choice_constraint([])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_left_without_a_token_ends_rather_than_samples_token_0(compiler, tokenizer, temperature):
    sampler = Sampler(VOCAB + 20, DEVICE)
    choice = choice_constraint(["ab"])
    # min_tokens forbids eos, and once "ab" is out the grammar allows only eos: the grammar wins.
    s = state(VOCAB + 20, compiler, grammar=choice, min_tokens=6, temperature=temperature, seed=1)
    ids = generate(sampler, s, seed=0, steps=8)
    text = decode(tokenizer, ids)
    assert text == "ab" and ids[-1] == EOS and 0 not in ids, ids
    # allowed_token_ids outside the choice: no token is left from the start, and the row ends.
    outside = tokenizer.encode("z", add_special_tokens=False).ids
    s = state(VOCAB + 20, compiler, grammar=choice, allowed_token_ids=outside, temperature=temperature, seed=1)
    assert generate(sampler, s, seed=0, steps=4) == [EOS]
    # bad_words banning eos beside allowed_token_ids of only eos: the same.
    s = state(VOCAB + 20, allowed_token_ids=[EOS], bad_words_token_ids=[[EOS]], temperature=temperature, seed=1)
    assert int(sampler.sample(logits_row(VOCAB + 20, 0), [s])[0][0]) == EOS
    # A row with tokens left is untouched beside it (the same logits, the same pick).
    free = state(VOCAB + 20, temperature=0.0, allowed_token_ids=[7, 8])
    logits = logits_row(VOCAB + 20, 5).expand(2, -1).contiguous()
    ids, _ = sampler.sample(logits, [state(VOCAB + 20, allowed_token_ids=[EOS], bad_words_token_ids=[[EOS]]), free])
    assert int(ids[0]) == EOS and int(ids[1]) == max((7, 8), key=lambda t: float(logits[1, t]))
