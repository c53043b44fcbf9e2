"""End to end through ``pied.LLM``: exact against transformers, invariant under chunking, preemption
and batch composition, and no leaked blocks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_models import PHI3_LONGROPE, build_model_dir, load_hf_model

from pied import LLM, SamplingParams

PROMPTS = [
    [1, 17, 99, 3, 250],
    [1] + list(range(40, 77)),
    [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314],  # exactly one block
    [1] + [(i * 37) % 500 + 5 for i in range(70)],
]
MAX_TOKENS = 24


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens, cut at the first near-tie (top-2 margin < 1e-3)."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    for step, scores in enumerate(out.scores):
        top2 = scores[0].float().topk(2).values
        if (top2[0] - top2[1]).item() < 1e-3:
            return tokens[:step]
    return tokens


def assert_prefix_equal(ours: list[int], reference: list[int]) -> None:
    assert len(reference) > 0, "reference empty: near-tie on the first token, pick another seed"
    assert ours[: len(reference)] == reference


MODEL_VARIANTS = {
    "llama": dict(arch="llama"),
    "qwen2-sharded": dict(arch="qwen2", sharded=True),
    "mistral": dict(arch="mistral"),
    "llama3-rope-tied": dict(
        arch="llama",
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-mha": dict(arch="llama", num_key_value_heads=4),
    "qwen3": dict(arch="qwen3"),
    "gemma3": dict(arch="gemma3"),
    "phi3": dict(arch="phi3"),
    # longrope with every sequence past the original context from its prompt on (long factors), and
    # with none reaching it (short factors). transformers' generate recomputes a sequence's cache
    # when it crosses the original context; pied does not (see workers/executor/model.py).
    "phi3-longrope-long": dict(
        arch="phi3", original_max_position_embeddings=4, rope_parameters=PHI3_LONGROPE
    ),
    "phi3-longrope-short": dict(
        arch="phi3", original_max_position_embeddings=128, rope_parameters=PHI3_LONGROPE
    ),
    "smollm3": dict(arch="smollm3"),
    "gemma3-multimodal-folder": dict(arch="gemma3-multimodal"),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_greedy_batch_matches_transformers(tmp_path, variant):
    options = dict(MODEL_VARIANTS[variant])
    path = build_model_dir(tmp_path, options.pop("arch"), **options)
    reference_model = load_hf_model(path)
    llm = LLM(model=str(path), dtype="float32", block_size=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    for prompt, output in zip(PROMPTS, outputs):
        assert_prefix_equal(output.outputs[0].token_ids, hf_greedy(reference_model, prompt, MAX_TOKENS))


def greedy_tokens(llm: LLM, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def assert_no_blocks_in_use(llm: LLM) -> None:
    # The actors run as threads of this process: their objects are reachable, and generate()
    # returns once the engine is idle.
    scheduler = llm.engine.actor("scheduler").scheduler
    assert not scheduler.has_unfinished()
    assert scheduler.usage == 0.0
    assert scheduler.block_manager.num_free == llm.engine.actor("executor").runner.num_device_blocks
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.device_usage == 0.0


def test_chunked_prefill_gives_same_tokens(llama_dir):
    one_shot = LLM(model=str(llama_dir), block_size=4)
    chunked = LLM(model=str(llama_dir), block_size=4, max_num_batched_tokens=7)
    assert greedy_tokens(chunked) == greedy_tokens(one_shot)
    assert_no_blocks_in_use(chunked)


def test_heavy_preemption_gives_same_tokens(llama_dir):
    roomy = LLM(model=str(llama_dir), block_size=4)
    # 26 blocks of 4 tokens: the longest request (71 + 24 tokens) just fits alone, so the batch
    # keeps preempting by recompute.
    tight = LLM(model=str(llama_dir), block_size=4, device_kv_blocks=26)
    assert greedy_tokens(tight) == greedy_tokens(roomy)
    assert tight.engine.stats().num_preemptions > 0
    assert_no_blocks_in_use(tight)


def test_same_seed_same_output_whatever_the_batch(llama_dir):
    llm = LLM(model=str(llama_dir), block_size=4)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": PROMPTS[1]}, seeded)[0].outputs[0].token_ids
    batch = llm.generate(
        [{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}, {"prompt_token_ids": PROMPTS[3]}],
        [other, seeded, other],
    )
    assert batch[1].outputs[0].token_ids == alone
    unseeded = llm.generate({"prompt_token_ids": PROMPTS[1]}, other)[0].outputs[0].token_ids
    assert len(unseeded) == 20
    assert_no_blocks_in_use(llm)


def test_finish_reasons_stop_strings_and_n(llama_dir):
    llm = LLM(model=str(llama_dir), block_size=4)
    free_run = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    choice = free_run.outputs[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 12
    # A stop string taken from the middle of the free-running text ends the output right before it.
    text = choice.text
    assert len(text) > 6
    stop = text[3:6]
    stopped = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == stop
    assert stopped.outputs[0].text == text[: text.index(stop)]
    # n choices with a seed: n outputs, reproducible.
    params = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=8, ignore_eos=True)
    first = llm.generate("x", params)[0]
    second = llm.generate("x", params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert_no_blocks_in_use(llm)


def test_logprobs_match_transformers(llama_dir):
    llm = LLM(model=str(llama_dir), block_size=4)
    prompt = PROMPTS[1]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, logprobs=3))[0]
    choice = out.outputs[0]
    model = load_hf_model(llama_dir)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    best = reference.topk(3)
    entry = choice.logprobs[0]
    assert list(entry)[0] == choice.token_ids[0] == best.indices[0].item()
    assert set(entry) == set(best.indices.tolist())
    # vLLM's Logprob: the value, the rank in the whole distribution and the token's text.
    for token_id, value in entry.items():
        assert abs(value.logprob - reference[token_id].item()) < 1e-4
        assert value.rank == int((reference > reference[token_id]).sum()) + 1
        assert value.decoded_token == llm.get_tokenizer().decode([token_id], skip_special_tokens=False)
    # A sampled token outside the top k still has its true rank (computed in the sampler).
    sampled = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, logprobs=0, allowed_token_ids=[7])
    )[0].outputs[0]
    [(token_id, value)] = sampled.logprobs[0].items()
    assert token_id == 7 and value.rank == int((reference > reference[7]).sum()) + 1


def test_prompt_too_long_is_a_clear_error(llama_dir):
    llm = LLM(model=str(llama_dir), max_model_len=32)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate({"prompt_token_ids": list(range(1, 40))})
    assert_no_blocks_in_use(llm)


def test_cli_generate(llama_dir):
    run = subprocess.run(
        [sys.executable, "-m", "pied", "generate", "--model", str(llama_dir), "--prompt", "def", "--max-tokens", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("def")
    assert "5 tokens" in run.stderr


def test_cli_bad_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    run = subprocess.run(
        [sys.executable, "-m", "pied", "generate", "--model", str(tmp_path), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "config.json" in run.stderr
    assert "Traceback" not in run.stderr


def test_llm_takes_a_path_and_a_chat_template_for_a_folder_without_one(tmp_path):
    import json
    from pathlib import Path

    from pied.chat_template import ChatTemplateError

    folder = build_model_dir(tmp_path / "no-template", "llama")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    template = settings.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    conversation = [{"role": "user", "content": "hello there"}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(model=Path(folder), block_size=4) as llm:  # a folder as a Path, as vLLM's users pass it
        assert llm.config.model == str(folder)
        with pytest.raises(ChatTemplateError, match=r"chat_template="):  # says how, in Python
            llm.chat(conversation, params)
        chatted = llm.chat(conversation, params, chat_template=template)[0]
        # The same tokens as generating from the conversation rendered with that template.
        rendered = llm.tokenizer.apply_chat_template(conversation, chat_template=template)
        prompt = {"prompt": rendered, "prompt_token_ids": llm.tokenizer.encode(rendered, add_special_tokens=False)}
        assert chatted.prompt_token_ids == prompt["prompt_token_ids"]
        assert chatted.outputs[0].token_ids == llm.generate([prompt], params)[0].outputs[0].token_ids
        # Without the generation prompt the rendering ends at the user's turn.
        bare = llm.chat(conversation, params, chat_template=template, add_generation_prompt=False)[0]
        assert len(bare.prompt_token_ids) < len(chatted.prompt_token_ids)
        # continue_final_message: the last (assistant) message is left open for the model to go on.
        opened = [*conversation, {"role": "assistant", "content": "General"}]
        going_on = llm.chat(
            opened, params, chat_template=template, add_generation_prompt=False, continue_final_message=True
        )[0]
        assert going_on.prompt.endswith("General"), going_on.prompt
        with pytest.raises(ValueError, match="continue_final_message"):
            llm.chat(opened, params, chat_template=template, continue_final_message=True)


def test_stop_reason_names_a_stop_token_but_not_the_eos(tmp_path):
    from tiny_models import EOS, IM_END

    # IM_END is a second EOS id of the generation config (as chat models list <|im_end|>).
    folder = build_model_dir(tmp_path / "two-eos", "llama", extra_eos=[IM_END])
    with LLM(model=str(folder), block_size=4) as llm:

        def ended_by(token: int, **params) -> tuple[str, int | str | None]:
            # The only token the request may sample: it ends the output at once.
            output = llm.generate("x", SamplingParams(max_tokens=4, allowed_token_ids=[token], **params))[0].outputs[0]
            assert output.token_ids == [token]
            return output.finish_reason, output.stop_reason

        # As vLLM reports them: the tokenizer's EOS ended it by itself (no stop reason); another EOS
        # id of the model's, or a stop token the request listed (the EOS too), is named.
        assert ended_by(EOS) == ("stop", None)
        assert ended_by(IM_END) == ("stop", IM_END)
        assert ended_by(EOS, stop_token_ids=[EOS]) == ("stop", EOS)
        assert ended_by(7, stop_token_ids=[7]) == ("stop", 7)


def test_bad_requests_are_value_errors_before_anything_runs(llama_dir):
    """What the API refuses with a 400, the offline API refuses with a ValueError naming it, before
    any request of the call goes out; the engine serves the next call as if nothing happened."""
    with LLM(model=str(llama_dir), block_size=4) as llm:
        ok = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        reference = greedy_tokens(llm, max_tokens=4)
        vocab = llm.engine.vocab_size
        bad_calls = [
            ({"prompt_token_ids": [1, vocab]}, ok, "out of vocabulary"),  # the engine died of this
            ({"prompt_token_ids": [-5, 1, 1]}, ok, "out of vocabulary"),
            ("x", SamplingParams(max_tokens=4, seed=1.5), "seed"),  # a float where an int goes: hung
            ("x", SamplingParams(max_tokens=2.5), "max_tokens"),
            ("x", SamplingParams(max_tokens=4, seed=2**64), "seed"),  # could not be sent: wedged the engine
            ("x", SamplingParams(max_tokens=4, temperature=float("nan")), "temperature"),
            ("x", SamplingParams(max_tokens=4, allowed_token_ids=[vocab + 7]), "allowed_token_ids"),
            ("x", SamplingParams(max_tokens=4, logit_bias={vocab: 5.0}), "logit_bias"),
        ]
        for prompt, params, named in bad_calls:
            with pytest.raises(ValueError, match=named):
                # The first prompt is fine: it must not run either.
                llm.generate([{"prompt_token_ids": PROMPTS[0]}, prompt], [ok, params])
            assert llm.engine.num_open_requests == 0
        assert greedy_tokens(llm, max_tokens=4) == reference
        # vLLM takes a single stop string as a list of one.
        free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        text = llm.generate("def f(x):", free)[0].outputs[0].text
        stop = text[3:6]
        stopped = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop))
        assert stopped[0].outputs[0].stop_reason == stop
        assert_no_blocks_in_use(llm)


def test_a_request_that_cannot_be_sent_leaves_the_engine_idle(llama_dir):
    import proto
    from pied.llm import prompt_request

    with LLM(model=str(llama_dir), block_size=4) as llm:
        unsendable = prompt_request("x", PROMPTS[0], SamplingParams(max_tokens=2, seed=2**64))

        async def submit_then_wait():
            with pytest.raises(OverflowError):
                llm.engine.add_request(unsendable)
            return await llm.engine.wait_idle(5)

        stats = llm._loop.call(submit_then_wait())  # idle at once, not a 5 s timeout
        assert isinstance(stats, proto.Stats) and llm.engine.num_open_requests == 0
        assert greedy_tokens(llm, max_tokens=2)
