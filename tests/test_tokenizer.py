"""The tokenizer folder reader, checked against transformers on the tiny folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import BOS, CHAT_TEMPLATE, EOS, IM_END, tokenizer_json

from pied.chat_template import ChatTemplateError
from pied.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "",
    "hello world",
    "Hello, World! How are you?",
    "  leading and trailing spaces  ",
    "<s>starts with bos",
    "ends with eos</s>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "héllo wörld 😀 日本語",
    "tabs\tand\nnewlines\r\n",
    "def f(x):\n    return x ** 2  # comment",
]

CONFIG = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "</s>",
    "add_bos_token": True,
    "chat_template": CHAT_TEMPLATE,
    "model_max_length": 512,
}


def write_folder(path: Path, config: dict | None = None, tokenizer: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer if tokenizer is not None else tokenizer_json(512))
    (path / "tokenizer_config.json").write_text(json.dumps(CONFIG if config is None else config))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "tok")


@pytest.fixture
def model_folder(tiny_model_dir) -> Path:
    """A full tiny model folder (conftest.py's, shared across the session; read-only)."""
    return tiny_model_dir("llama")


# ---------------------------------------------------------------- agreement with transformers


def test_encode_agrees_with_transformers(model_folder):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_folder(model_folder)
    # transformers 5 ignores tokenizer_config's add_bos_token when a tokenizer.json exists;
    # passing it explicitly gives transformers 4's reading of the same folder, which pied follows.
    theirs = transformers.AutoTokenizer.from_pretrained(model_folder, add_bos_token=True)
    plain = transformers.AutoTokenizer.from_pretrained(model_folder)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == plain.encode(text, add_special_tokens=False), (
            text
        )
        expected = theirs.encode(text)
        if text.startswith("<s>"):
            expected = expected[1:]  # transformers doubles the BOS here; pied never does
        assert ours.encode(text) == expected, text


def test_decode_and_tokens_agree_with_transformers(model_folder):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer(model_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(model_folder)
    for text in TEXTS:
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.vocab_size == len(theirs) == 512
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id) == (BOS, EOS)
    assert set(theirs.all_special_ids) <= set(ours.all_special_ids)


def test_chat_template_agrees_with_transformers(model_folder):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer(model_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(model_folder)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "héllo 😀"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again?"},
    ]
    for add_generation_prompt in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == (
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        )


# ---------------------------------------------------------------- BOS and special tokens


def test_bos_is_prepended_once(folder):
    tokenizer = Tokenizer(folder)
    plain = tokenizer.encode("hello", add_special_tokens=False)
    assert tokenizer.encode("hello") == [BOS, *plain]
    assert tokenizer.encode("") == [BOS]
    assert tokenizer.encode("<s>hello").count(BOS) == 1


def test_no_bos_when_add_bos_token_is_false(tmp_path):
    tokenizer = Tokenizer(write_folder(tmp_path, {**CONFIG, "add_bos_token": False}))
    assert tokenizer.encode("hello") == tokenizer.encode("hello", add_special_tokens=False)


def test_post_processor_bos_is_not_doubled(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    backend = Backend.from_str(tokenizer_json(512))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    for add_bos in (True, False):
        tokenizer = Tokenizer(
            write_folder(tmp_path / str(add_bos), {**CONFIG, "add_bos_token": add_bos}, backend.to_str())
        )
        ids = tokenizer.encode("hello")
        assert ids[0] == BOS and ids.count(BOS) == 1
        assert BOS not in tokenizer.encode("hello", add_special_tokens=False)


def test_add_eos_token(tmp_path):
    tokenizer = Tokenizer(write_folder(tmp_path, {**CONFIG, "add_eos_token": True}))
    ids = tokenizer.encode("hello")
    assert ids[0] == BOS and ids[-1] == EOS and ids.count(EOS) == 1


def test_special_tokens_as_dicts(tmp_path):
    config = {
        **CONFIG,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False},
        "eos_token": {"content": "<|im_end|>"},
    }
    tokenizer = Tokenizer(write_folder(tmp_path, config))
    assert tokenizer.bos_token_id == BOS and tokenizer.eos_token_id == IM_END
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "<|im_end|>"


def test_special_ids_and_tokens(folder):
    tokenizer = Tokenizer(folder)
    assert tokenizer.all_special_ids == [0, 1, 2, 3, 4]  # the added tokens flagged special count too
    assert tokenizer.pad_token_id == EOS and tokenizer.unk_token_id == 0
    assert tokenizer.convert_ids_to_tokens(IM_END) == "<|im_end|>"
    assert tokenizer.convert_ids_to_tokens([BOS, EOS]) == ["<s>", "</s>"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 3
    assert len(tokenizer) == tokenizer.vocab_size == 512


def test_decode_skips_special_tokens_by_default(folder):
    tokenizer = Tokenizer(folder)
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids) == "user\nhi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s><|im_start|>user\nhi<|im_end|>"


def test_round_trip_and_array_input(folder):
    import numpy as np

    tokenizer = Tokenizer(folder)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(np.array(ids, dtype=np.int32), skip_special_tokens=False) == text


def test_model_max_length(tmp_path):
    assert Tokenizer(write_folder(tmp_path / "a")).model_max_length == 512
    unlimited = {**CONFIG, "model_max_length": 1000000000000000019884624838656}
    assert Tokenizer(write_folder(tmp_path / "b", unlimited)).model_max_length is None


def test_missing_config_uses_defaults(tmp_path):
    tmp_path.joinpath("tokenizer.json").write_text(tokenizer_json(512))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- chat templates


def test_chat_template_list_picks_default_or_tool_use(tmp_path):
    config = {
        **CONFIG,
        "chat_template": [
            {"name": "default", "template": "D{{ messages[0]['content'] }}"},
            {"name": "tool_use", "template": "T{{ tools[0]['name'] }}"},
        ],
    }
    tokenizer = Tokenizer(write_folder(tmp_path, config))
    messages = [{"role": "user", "content": "x"}]
    assert tokenizer.apply_chat_template(messages) == "Dx"
    assert tokenizer.apply_chat_template(messages, tools=[{"name": "f"}]) == "Tf"
    assert tokenizer.apply_chat_template(messages, chat_template="tool_use", tools=[{"name": "g"}]) == "Tg"
    assert tokenizer.apply_chat_template(messages, chat_template="literal {{ 1 + 1 }}") == "literal 2"


def test_chat_template_files_take_priority(tmp_path):
    folder = write_folder(tmp_path)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert Tokenizer(folder).chat_template == "json"
    (folder / "chat_template.jinja").write_text("jinja {{ bos_token }}")
    tokenizer = Tokenizer(folder)
    assert tokenizer.apply_chat_template([]) == "jinja <s>"
    assert Tokenizer(folder, chat_template="override").chat_template == "override"


def test_chat_template_sees_special_tokens_and_kwargs(folder):
    template = "{{ bos_token }}{{ eos_token }}{% if enable_thinking %}think{% endif %}"
    tokenizer = Tokenizer(folder, chat_template=template)
    assert tokenizer.apply_chat_template([]) == "<s></s>"
    assert tokenizer.apply_chat_template([], enable_thinking=True) == "<s></s>think"
    assert tokenizer.apply_chat_template([], bos_token="B") == "B</s>"


def test_bad_chat_template_entry(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat_template must be"):
        Tokenizer(write_folder(tmp_path, {**CONFIG, "chat_template": 42}))


# ---------------------------------------------------------------- errors


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json does not exist"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        Tokenizer(tmp_path)


def test_invalid_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is not a valid tokenizer"):
        Tokenizer(write_folder(tmp_path, tokenizer='{"model": 3}'))


@pytest.mark.parametrize(
    "content, message", [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object")]
)
def test_invalid_tokenizer_config(tmp_path, content, message):
    folder = write_folder(tmp_path)
    (folder / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match=message) as raised:
        Tokenizer(folder)
    assert "tokenizer_config.json" in str(raised.value)
    assert isinstance(raised.value, ValueError)
