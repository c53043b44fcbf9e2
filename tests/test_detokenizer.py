"""Incremental detokenisation: the streamed deltas add up to exactly the final text."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import CHAT_TEMPLATE, tokenizer_json

import proto
from pied.detokenizer import IncrementalDetokenizer
from pied.tokenizer import Tokenizer

VOCAB = 512
UNICODE_TEXT = "héllo wörld 😀 日本語"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "tokenizer.json").write_text(tokenizer_json(VOCAB))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(folder)


def stream(
    tokenizer: Tokenizer,
    output_ids: list[int],
    chunks: list[int] | None = None,
    prompt_ids: list[int] | None = None,
    finish: bool = True,
    **params,
) -> tuple[list[str], IncrementalDetokenizer]:
    """Push ``output_ids`` in chunks of the given sizes (one token each by default)."""
    detokenizer = IncrementalDetokenizer(
        tokenizer, prompt_ids if prompt_ids is not None else [1, 50, 60], proto.SamplingParams(**params)
    )
    deltas = []
    position = 0
    for size in chunks or [1] * len(output_ids):
        if position >= len(output_ids):
            break
        deltas.append(detokenizer.push(output_ids[position : position + size]))
        position += size
    if position < len(output_ids):
        deltas.append(detokenizer.push(output_ids[position:]))
    if finish:
        deltas.append(detokenizer.finish())
    return deltas, detokenizer


# ---------------------------------------------------------------- exactness


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    output_ids=st.lists(st.integers(0, VOCAB - 1), max_size=40),
    prompt_ids=st.lists(st.integers(0, VOCAB - 1), max_size=8),
    chunks=st.lists(st.integers(1, 4), max_size=40),
    skip_special_tokens=st.booleans(),
)
def test_deltas_add_up_to_a_full_decode(tokenizer, output_ids, prompt_ids, chunks, skip_special_tokens):
    deltas, detokenizer = stream(
        tokenizer, output_ids, chunks, prompt_ids, skip_special_tokens=skip_special_tokens
    )
    expected = tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == expected == detokenizer.text
    # Only a full decode may show a replacement character that an incomplete sequence became.
    assert all("\ufffd" not in delta for delta in deltas[:-1]) or "\ufffd" in expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=30), chunks=st.lists(st.integers(1, 3), max_size=40))
def test_any_text_streams_back_exactly(tokenizer, text, chunks):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, _ = stream(tokenizer, ids, chunks)
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas) or "\ufffd" in text


def test_multibyte_characters_split_across_tokens(tokenizer):
    ids = tokenizer.encode(UNICODE_TEXT, add_special_tokens=False)
    # The test means something only if some characters really are split across byte tokens.
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)
    deltas, detokenizer = stream(tokenizer, ids, finish=False)
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == UNICODE_TEXT == detokenizer.text
    assert "😀" in deltas and "日" in deltas  # each appears whole, at the token that completes it
    assert detokenizer.finish() == ""


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tokenizer):
    ids = tokenizer.encode("ab😀", add_special_tokens=False)
    deltas, detokenizer = stream(tokenizer, ids[:-1], finish=False)
    assert "".join(deltas) == "ab"
    assert detokenizer.finish() == "\ufffd" and detokenizer.text == tokenizer.decode(ids[:-1]) == "ab\ufffd"


def test_prompt_ending_inside_a_character(tokenizer):
    ids = tokenizer.encode("x日本", add_special_tokens=False)
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    deltas, _ = stream(tokenizer, ids[split:], prompt_ids=ids[:split])
    assert "".join(deltas) == tokenizer.decode(ids[split:])


def test_special_tokens(tokenizer):
    ids = tokenizer.encode("hi<|im_end|>there</s>", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids)[0]) == "hithere"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)[0]) == "hi<|im_end|>there</s>"


def test_prompt_context_keeps_sentencepiece_spaces(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.WordLevel({"▁Hello": 0, "▁world": 1, "<unk>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.decode([1]) == "world"  # alone, SentencePiece drops the leading space
    # After the prompt the word keeps its space, as in vLLM.
    assert "".join(stream(tokenizer, [1, 1], prompt_ids=[0])[0]) == " world world"
    assert "".join(stream(tokenizer, [1, 1], prompt_ids=[])[0]) == "world world"


# ---------------------------------------------------------------- stop strings


def test_stop_string_spanning_tokens(tokenizer):
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, detokenizer = stream(tokenizer, ids, stop=["fox jumps"], finish=False)
    assert detokenizer.stopped and detokenizer.stop_reason == "fox jumps"
    assert "".join(deltas) == "The quick brown " == detokenizer.text
    assert detokenizer.push(ids[:3]) == "" and detokenizer.finish() == ""

    deltas, detokenizer = stream(tokenizer, ids, stop=["fox jumps"], include_stop_str_in_output=True)
    assert "".join(deltas) == "The quick brown fox jumps" == detokenizer.text


def test_possible_stop_prefix_is_held_back(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [1], proto.SamplingParams(stop=["<END>", "xyz"]))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert detokenizer.push(encode("abc <E")) == "abc "  # "<E" could start "<END>"
    assert detokenizer.push(encode("N")) == ""
    assert detokenizer.push(encode("O")) == "<ENO"  # it did not
    assert detokenizer.push(encode(" x")) == " "
    assert detokenizer.finish() == "x"  # the end flushes what was held
    assert detokenizer.text == "abc <ENO x" and not detokenizer.stopped


def test_first_complete_stop_string_wins(tokenizer):
    ids = tokenizer.encode("one two three", add_special_tokens=False)
    deltas, detokenizer = stream(tokenizer, ids, chunks=[len(ids)], stop=["three", "two"])
    assert detokenizer.stop_reason == "two" and "".join(deltas) == "one "
    # "e t" is complete before "one two" is, even though "one two" starts first.
    for chunks in ([1] * len(ids), [len(ids)]):
        deltas, detokenizer = stream(tokenizer, ids, chunks=chunks, stop=["one two", "e t"])
        assert detokenizer.stop_reason == "e t" and "".join(deltas) == "on"


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode("stop at stop", add_special_tokens=False)
    first = len(tokenizer.encode("stop", add_special_tokens=False))
    deltas, detokenizer = stream(tokenizer, ids, stop=["stop"], min_tokens=first + 1)
    assert detokenizer.stopped and "".join(deltas) == "stop at "


def test_stop_string_with_multibyte_characters(tokenizer):
    ids = tokenizer.encode(UNICODE_TEXT, add_special_tokens=False)
    deltas, detokenizer = stream(tokenizer, ids, stop=["日本"])
    assert "".join(deltas) == "héllo wörld 😀 " and detokenizer.stop_reason == "日本"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet="ab cé😀\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab cé😀\n", min_size=1, max_size=4), min_size=1, max_size=3),
    chunks=st.lists(st.integers(1, 3), max_size=40),
    include=st.booleans(),
)
def test_streamed_stop_strings_match_the_whole_text(tokenizer, text, stops, chunks, include):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, detokenizer = stream(tokenizer, ids, chunks, stop=stops, include_stop_str_in_output=include)
    # The stop string complete first (the earliest end; ties: the longer one, then the first listed).
    found = [
        (text.find(stop) + len(stop), text.find(stop), stops.index(stop), stop)
        for stop in stops
        if stop in text
    ]
    if found:
        _, position, _, stop = min(found)
        expected = text[: position + len(stop)] if include else text[:position]
        assert detokenizer.stopped and detokenizer.stop_reason == stop
    else:
        expected = text
        assert not detokenizer.stopped
    assert "".join(deltas) == expected == detokenizer.text
