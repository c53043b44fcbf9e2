"""The bundled model (pied/models/default, made by scripts/train_default_model.py) loads with pied's
own loader when no model is named, stays small, and answers a chat request with English-like text
that ends at ``<|im_end|>``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from pied import LLM, SamplingParams
from pied.default_model import default_model_dir
from pied.tokenizer import Tokenizer
from workers.model_config import ModelConfig

MAX_FOLDER_BYTES = 25 * 2**20


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    # One thread: a model this small gains nothing from more, and on a busy machine extra threads
    # spin against other processes (4-20x slower decoding on a shared 2-core box).
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield LLM()  # no model: the bundled one
    finally:
        torch.set_num_threads(num_threads)


def test_folder_is_complete_and_small() -> None:
    folder = default_model_dir()
    names = {path.name for path in folder.iterdir()}
    expected = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    assert expected <= names
    assert sum(path.stat().st_size for path in folder.iterdir()) <= MAX_FOLDER_BYTES
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_generation_ends_at_im_end_and_eos() -> None:
    """A chat reply ends with <|im_end|>, plain text with </s>: both must stop generation."""
    folder = default_model_dir()
    tokenizer = Tokenizer.from_folder(folder)
    im_end, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "</s>"])
    assert {im_end, eos} <= ModelConfig.from_folder(folder).eos_token_ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_reply_is_english_like(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=80)
    output = llm.chat([{"role": "user", "content": "Tell me about lists"}], params)[0].outputs[0]
    text = output.text
    assert text.strip(), output
    letters_and_spaces = sum(ch.isascii() and (ch.isalpha() or ch == " ") for ch in text)
    assert letters_and_spaces / len(text) >= 0.7, text


def test_sampled_replies_end(llm: LLM) -> None:
    """The model learned where a reply stops: at the temperature chat uses, replies finish with
    <|im_end|> long before a generous limit (greedy decoding of a model this small may loop)."""
    questions = [
        "What does len do?",
        "Explain the for statement.",
        "What is a dictionary?",
        "Tell me about exceptions.",
        "Hello!",
        "How do classes work?",
    ]
    conversations = [[{"role": "user", "content": question}] for question in questions]
    outputs = [
        llm.chat(conversation, SamplingParams(temperature=0.7, max_tokens=300, seed=seed))[0].outputs[0]
        for seed, conversation in enumerate(conversations)
    ]
    finished = [output for output in outputs if output.finish_reason == "stop"]
    assert len(finished) >= len(outputs) * 2 // 3, [(o.finish_reason, o.text) for o in outputs]
    assert all(output.text.strip() for output in finished)


def test_pied_serve_with_no_arguments_answers_chat_in_english():
    """`pied serve` with no --model serves the bundled model; a chat reply over real HTTP is text."""
    from server import start_server

    server = start_server(None)
    try:
        response = server.request(
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Tell me about lists"}], "temperature": 0, "max_tokens": 60},
        )
        assert response.status == 200, response.text
        reply = response.json()["choices"][0]["message"]["content"]
        assert reply.strip()
        letters = sum(ch.isascii() and (ch.isalpha() or ch.isspace()) for ch in reply)
        assert letters / len(reply) >= 0.7, reply
    finally:
        assert server.stop() == 0
