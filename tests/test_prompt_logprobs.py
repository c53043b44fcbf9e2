"""``prompt_logprobs``: every prompt token's logprob given the tokens before it, its rank and the
top-k at its position, equal to log_softmax of transformers' logits for the prompt — with the prompt
spread over several steps (chunked prefill), batched with other requests, after a prefix-cache hit
would have skipped it (the prompt is recomputed), and through the HTTP API (completions and chat)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from server import running_server
from step_plans import Chunk, make_plan, new_request
from tiny_models import load_hf_model

import proto
from pied import LLM, SamplingParams
from pied.outputs import Logprob
from proto.config import EngineConfig
from workers.executor.runner import ModelRunner

ATOL = 2e-4  # float32 model, two implementations
PROMPT = [int(t) for t in np.random.default_rng(0).integers(5, 500, size=29)]
OTHER = [int(t) for t in np.random.default_rng(1).integers(5, 500, size=11)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    """log_softmax of transformers' logits, per prompt: row p predicts token p + 1."""
    model = load_hf_model(model_dir)

    def logprobs(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0].float()
        return logits.log_softmax(dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def llm(model_dir):
    # 8 tokens a step: the 29-token prompt is computed over four steps.
    with LLM(model=str(model_dir), device="cpu", block_size=4, max_num_batched_tokens=8) as engine:
        yield engine


def check_against_reference(entries, token_ids: list[int], reference_logprobs: torch.Tensor, k: int) -> None:
    assert len(entries) == len(token_ids) and entries[0] is None
    for position in range(1, len(token_ids)):
        row = reference_logprobs[position - 1]
        token_id = token_ids[position]
        entry = entries[position]
        assert next(iter(entry)) == token_id  # the prompt token comes first
        logprob, rank = entry[token_id].logprob, entry[token_id].rank  # vLLM's Logprob
        assert logprob == pytest.approx(row[token_id].item(), abs=ATOL), position
        assert rank == int((row > row[token_id]).sum()) + 1
        top = row.topk(k)
        expected_top = dict(zip(top.indices.tolist(), top.values.tolist()))
        assert set(entry) == set(expected_top) | {token_id}
        for r, (top_id, top_logprob) in enumerate(expected_top.items()):
            assert entry[top_id].logprob == pytest.approx(top_logprob, abs=ATOL)
            if top_id != token_id:
                assert entry[top_id].rank == r + 1


def test_prompt_logprobs_equal_transformers_with_chunked_prefill(llm, reference) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    # Batched with a request that asks for none, and one whose prompt fits a step.
    outputs = llm.generate(
        [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": OTHER}, {"prompt_token_ids": OTHER}],
        [params, plain, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)],
    )
    check_against_reference(outputs[0].prompt_logprobs, PROMPT, reference(PROMPT), 3)
    assert outputs[1].prompt_logprobs is None
    check_against_reference(outputs[2].prompt_logprobs, OTHER, reference(OTHER), 0)
    # The output itself is unchanged by asking: the same greedy tokens.
    again = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=2))
    assert again[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids


def test_a_cached_prompt_is_recomputed_for_its_logprobs(llm, reference) -> None:
    prompt = PROMPT[:5] + OTHER  # 16 tokens: four full blocks of 4
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    cached = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1))
    assert cached[0].num_cached_tokens > 0  # the prefix cache holds it
    asked = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))
    assert asked[0].num_cached_tokens == 0  # recomputed, not read from the cache
    check_against_reference(asked[0].prompt_logprobs, prompt, reference(prompt), 2)


def test_n_choices_compute_them_once(llm, reference) -> None:
    params = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=2, prompt_logprobs=1)
    (output,) = llm.generate({"prompt_token_ids": OTHER}, params)
    assert len(output.outputs) == 3
    check_against_reference(output.prompt_logprobs, OTHER, reference(OTHER), 1)


def test_out_of_range_is_refused(llm) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        llm.generate("x", SamplingParams(prompt_logprobs=21))


# ---------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, "--served-model-name", "tiny", "--block-size", "4", "--max-num-batched-tokens", "8") as process:
        yield process


def test_completions_return_prompt_logprobs(server, reference) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2, "n": 2}
    response = server.request("POST", "/v1/completions", body)
    assert response.status == 200, response.text
    choices = response.json()["choices"]
    expected = reference(PROMPT)
    for choice in choices:  # every choice of the prompt carries them
        entries = choice["prompt_logprobs"]
        assert entries[0] is None and len(entries) == len(PROMPT)
        converted = [None] + [
            {int(t): Logprob(v["logprob"], v["rank"], v["decoded_token"]) for t, v in e.items()} for e in entries[1:]
        ]
        check_against_reference(converted, PROMPT, expected, 2)
        token_id = str(PROMPT[1])
        assert entries[1][token_id]["decoded_token"] is not None
    plain = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
    assert "prompt_logprobs" not in plain.json()["choices"][0]  # only when asked for


def test_chat_returns_prompt_logprobs(server) -> None:
    body = {"messages": [{"role": "user", "content": "A list holds"}], "max_tokens": 1, "prompt_logprobs": 0}
    answer = server.request("POST", "/v1/chat/completions", body)
    assert answer.status == 200, answer.text
    entries = answer.json()["prompt_logprobs"]
    tokens = server.request("POST", "/tokenize", {"messages": body["messages"]}).json()["tokens"]
    assert len(entries) == len(tokens) and entries[0] is None
    for token_id, entry in zip(tokens[1:], entries[1:]):
        assert list(entry) == [str(token_id)] and entry[str(token_id)]["rank"] >= 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20]"),
        ({"prompt_logprobs": "2"}, "prompt_logprobs must be an integer"),
        ({"prompt_logprobs": 1, "stream": True}, "not available when stream is true"),
    ],
)
def test_bad_requests_name_the_field(server, fields, message) -> None:
    for path, base in (
        ("/v1/completions", {"prompt": "The list"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        response = server.request("POST", path, {**base, "max_tokens": 1, **fields})
        assert response.status == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "prompt_logprobs" and message in error["message"]


# ---------------------------------------------------------------- the executor, step by step


def test_runner_sends_each_position_once_across_a_recomputation(model_dir, reference) -> None:
    """Chunks of one prompt, with a recomputation from position 0 in between (what a preempted request
    does): every position 1..P-1 is sent exactly once, in order, beside another request's sampled row."""
    runner = ModelRunner(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", block_size=4, device_kv_blocks=32))
    prompt = PROMPT[:13]
    blocks, other_blocks = [3, 9, 1, 20], [7, 8]
    new = [new_request("r", prompt, temperature=0.0, prompt_logprobs=2), new_request("s", OTHER[:6], temperature=0.0)]
    steps = [
        make_plan([Chunk("s", OTHER[:6], 0, other_blocks), Chunk("r", prompt[:5], 0, blocks[:2], sample=False)], 0, new),
        make_plan([Chunk("r", prompt[:9], 0, blocks[:3], sample=False)], 1),  # recomputed from 0
        make_plan([Chunk("r", prompt[9:], 9, blocks)], 2),
    ]
    runs = []
    for plan in steps:
        result = runner.execute(plan)
        runs += result.prompt_logprobs
        assert len(proto.unpack_i32(result.sampled_token_ids)) == sum(plan.sample)
    assert [(run.first_position, run.num_positions) for run in runs] == [(1, 5), (6, 4), (10, 3)]
    expected = reference(prompt)
    logprobs = np.concatenate([proto.unpack_f32(run.token_logprobs) for run in runs])
    want = [expected[p - 1, prompt[p]].item() for p in range(1, len(prompt))]
    np.testing.assert_allclose(logprobs, want, atol=ATOL)
    top_ids = np.concatenate([proto.unpack_i32(run.top_ids).reshape(-1, 2) for run in runs])
    assert top_ids.tolist() == expected[:-1].topk(2).indices.tolist()


def test_echo_with_logprobs_covers_the_prompt(server, reference) -> None:
    """Completions' echo with logprobs (vLLM's use of prompt logprobs): the echoed prompt's tokens
    get logprobs too, null for the first, then the generated tokens'."""
    prompt = OTHER
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 2}
    response = server.request("POST", "/v1/completions", body)
    assert response.status == 200, response.text
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert "prompt_logprobs" not in choice  # not asked for
    assert len(logprobs["tokens"]) == len(prompt) + 2
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = reference(prompt)
    want = [expected[p - 1, prompt[p]].item() for p in range(1, len(prompt))]
    np.testing.assert_allclose(logprobs["token_logprobs"][1 : len(prompt)], want, atol=ATOL)
    assert all(len(top) in (2, 3) for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    streamed = server.request("POST", "/v1/completions", {**body, "stream": True})
    assert streamed.status == 400 and streamed.json()["error"]["param"] == "echo"


def test_echo_with_max_tokens_0_scores_the_prompt_without_generating(server, reference) -> None:
    """max_tokens 0 with echo (vLLM's echo without generation; the legacy API's way of scoring a
    text): the prompt back with its logprobs, nothing generated, no completion tokens counted."""
    prompt = OTHER
    body = {"prompt": prompt, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": 1}
    response = server.request("POST", "/v1/completions", body)
    assert response.status == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]
    full = server.request("POST", "/v1/completions", {**body, "max_tokens": 2}).json()["choices"][0]
    assert full["text"].startswith(choice["text"]) and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt) and logprobs["token_logprobs"][0] is None
    expected = reference(prompt)
    want = [expected[p - 1, prompt[p]].item() for p in range(1, len(prompt))]
    np.testing.assert_allclose(logprobs["token_logprobs"][1:], want, atol=ATOL)
    assert answer["usage"]["completion_tokens"] == 0 and answer["usage"]["total_tokens"] == len(prompt)
    # Without echo, max_tokens 0 is still refused; streamed, echo without generation is too.
    unscored = {key: value for key, value in body.items() if key != "logprobs"}
    for refused in ({**body, "echo": False}, {**unscored, "stream": True}):
        error = server.request("POST", "/v1/completions", refused)
        assert error.status == 400 and error.json()["error"]["param"] == "max_tokens", error.text
