"""The OpenAI-compatible API against a real ``pied serve`` (subprocess, real HTTP, a tiny model):
the official ``openai`` client gets correct streamed and non-streamed answers, and the streamed
text of a greedy request is exactly the non-streamed text."""

from __future__ import annotations

import re

import openai
import pytest
from server import ServerProcess, api_server_fixtures, sse_events

MODEL = "tiny-llama"
MAX_MODEL_LEN = 128
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write a function that adds two numbers."},
]
PROMPT = "The class statement defines"


server, client = api_server_fixtures(MODEL, max_model_len=MAX_MODEL_LEN)


def stream_chat(client: openai.OpenAI, **kwargs) -> tuple[dict[int, str], dict[int, str | None], list]:
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kwargs))
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                assert choice.index not in finish, "finish_reason sent twice"
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


def stream_completion(client: openai.OpenAI, **kwargs) -> tuple[dict[int, str], dict[int, str | None], list]:
    chunks = list(client.completions.create(model=MODEL, stream=True, **kwargs))
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


# ---------------------------------------------------------------- chat


def test_chat_streamed_text_equals_full_text(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24)
    assert full.object == "chat.completion"
    assert full.model == MODEL
    choice = full.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.prompt_tokens_details.cached_tokens >= 0

    texts, finish, chunks = stream_chat(
        client, messages=MESSAGES, temperature=0, max_tokens=24, stream_options={"include_usage": True}
    )
    assert texts == {0: choice.message.content}
    assert finish == {0: choice.finish_reason}
    assert chunks[0].choices[0].delta.role == "assistant"
    # include_usage: null usage on every chunk, then one chunk with no choices and the totals.
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == []
    # The same prompt a second time: its full blocks come from the prefix cache, and usage says so.
    streamed_usage, full_usage = chunks[-1].usage.model_dump(), full.usage.model_dump()
    assert streamed_usage.pop("prompt_tokens_details")["cached_tokens"] > 0
    full_usage.pop("prompt_tokens_details")
    assert streamed_usage == full_usage


def test_chat_n_choices_and_max_completion_tokens(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_completion_tokens=8,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert len({c.message.content for c in full.choices}) == 1  # greedy: every choice the same
    assert all(c.finish_reason == "length" for c in full.choices)
    assert full.usage.completion_tokens == 3 * 8
    texts, finish, _ = stream_chat(
        client,
        messages=MESSAGES,
        temperature=0,
        max_completion_tokens=8,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {0: "length", 1: "length", 2: "length"}


def test_chat_without_max_tokens_uses_the_rest_of_the_context(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens + full.usage.completion_tokens == MAX_MODEL_LEN


def test_chat_logprobs(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # Greedy: the sampled token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert entry.bytes == list(entry.token.encode())


def test_chat_stop_string_ends_the_choice_in_both_modes(client: openai.OpenAI) -> None:
    reference = (
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .message.content
    )
    stop = reference[6:9]
    assert len(stop) == 3 and stop.strip(), f"the reference text is too short: {reference!r}"
    full = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=24,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    choice = full.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    assert choice.message.content == reference[: reference.index(stop)]
    texts, finish, _ = stream_chat(
        client, messages=MESSAGES, temperature=0, max_tokens=24, stop=stop, extra_body={"ignore_eos": True}
    )
    assert texts == {0: choice.message.content}
    assert finish == {0: "stop"}


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample() -> str:
        return (
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, temperature=1.0, top_p=0.9, seed=1234, max_tokens=12
            )
            .choices[0]
            .message.content
        )

    assert sample() == sample()


# ---------------------------------------------------------------- completions


def test_completion_streamed_text_equals_full_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=20)
    assert full.object == "text_completion"
    texts, finish, chunks = stream_completion(client, prompt=PROMPT, temperature=0, max_tokens=20)
    assert texts == {0: full.choices[0].text}
    assert finish == {0: full.choices[0].finish_reason}
    assert all(chunk.usage is None for chunk in chunks)  # usage only when asked for


def test_completion_token_prompts_and_prompt_lists(client: openai.OpenAI, server: ServerProcess) -> None:
    prompts = [PROMPT, "Lambda expressions"]
    token_ids = [server.request("POST", "/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    single = [
        client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=10).choices[0].text
        for p in prompts
    ]
    by_ids = client.completions.create(model=MODEL, prompt=token_ids[0], temperature=0, max_tokens=10)
    assert by_ids.choices[0].text == single[0]
    assert by_ids.usage.prompt_tokens == len(token_ids[0])

    # Two prompts, n=2: choice p * n + i.
    for prompt in (prompts, token_ids):
        full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, n=2)
        assert [c.text for c in sorted(full.choices, key=lambda c: c.index)] == [
            single[0], single[0], single[1], single[1]
        ]  # fmt: skip
        assert full.usage.prompt_tokens == sum(len(ids) for ids in token_ids)
        texts, _, chunks = stream_completion(
            client, prompt=prompt, temperature=0, max_tokens=10, n=2, stream_options={"include_usage": True}
        )
        assert texts == {0: single[0], 1: single[0], 2: single[1], 3: single[1]}
        assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_completion_echo_and_logprobs(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    texts, _, _ = stream_completion(client, prompt=PROMPT, temperature=0, max_tokens=8, echo=True)
    assert texts == {0: PROMPT + plain}

    scored = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=2, extra_body={"ignore_eos": True}
    )
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs)
    texts, _, chunks = stream_completion(
        client, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=2, extra_body={"ignore_eos": True}
    )
    streamed_tokens = [t for chunk in chunks for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert streamed_tokens == logprobs.tokens


def test_unknown_fields_are_ignored(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "not_an_openai_field": {"x": 1}, "user": "me"}
    response = server.request("POST", "/v1/completions", body)
    assert response.status == 200, response.text


# ---------------------------------------------------------------- small endpoints


def test_models_version_health(client: openai.OpenAI, server: ServerProcess) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).id == MODEL
    assert server.request("GET", "/health").status == 200
    version = server.request("GET", "/version").json()["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version)


def test_request_id_is_echoed_or_generated(server: ServerProcess) -> None:
    echoed = server.request("GET", "/v1/models", headers={"X-Request-Id": "my-request-7"})
    assert echoed.headers["x-request-id"] == "my-request-7"
    generated = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert len(generated.headers["x-request-id"]) >= 16
    streamed = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "stream": True},
                              headers={"X-Request-Id": "stream-1"})  # fmt: skip
    assert streamed.headers["x-request-id"] == "stream-1"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert sse_events(streamed.body)[-1] == "[DONE]"
    error = server.request("GET", "/no/such/path", headers={"X-Request-Id": "lost-1"})
    assert error.status == 404 and error.headers["x-request-id"] == "lost-1"


def test_tokenize_and_detokenize(server: ServerProcess) -> None:
    tokens = server.request("POST", "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    text = server.request("POST", "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith(PROMPT)
    chat = server.request("POST", "/tokenize", {"messages": MESSAGES}).json()
    rendered = server.request("POST", "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert rendered.endswith("<|im_start|>assistant\n") and MESSAGES[1]["content"] in rendered


def test_openapi_document_lists_endpoints_and_schemas(server: ServerProcess) -> None:
    document = server.request("GET", "/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, method in [
        ("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
        ("/health", "get"), ("/version", "get"), ("/tokenize", "post"), ("/detokenize", "post"),
        ("/metrics", "get"), ("/openapi.json", "get"),
    ]:  # fmt: skip
        assert method in paths[path], path
    schemas = document["components"]["schemas"]
    chat_schema = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    chat_request = schemas[chat_schema["$ref"].rsplit("/", 1)[1]]
    assert "messages" in chat_request["required"]
    for field in ("temperature", "top_k", "max_completion_tokens", "stream_options", "logprobs", "stop"):
        assert field in chat_request["properties"], field
    assert "ErrorResponse" in schemas


# ---------------------------------------------------------------- metrics


METRIC_TYPES = {
    "pied:num_requests_running": "gauge",
    "pied:num_requests_waiting": "gauge",
    "pied:kv_cache_usage_perc": "gauge",
    "pied:prompt_tokens_total": "counter",
    "pied:generation_tokens_total": "counter",
    "pied:request_success_total": "counter",
    "pied:num_preemptions_total": "counter",
    "pied:time_to_first_token_seconds": "histogram",
    "pied:inter_token_latency_seconds": "histogram",
    "pied:e2e_request_latency_seconds": "histogram",
    "pied:request_queue_time_seconds": "histogram",
}


def test_metrics_exposition(client: openai.OpenAI, server: ServerProcess) -> None:
    before = server.metrics()
    client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=5, extra_body={"ignore_eos": True}
    )
    response = server.request("GET", "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    for name, kind in METRIC_TYPES.items():
        help_index = lines.index(next(line for line in lines if line.startswith(f"# HELP {name} ")))
        assert lines[help_index + 1] == f"# TYPE {name} {kind}"
        # Every sample of the family follows its TYPE line before the next family starts.
        samples = [line for line in lines if line.split("{")[0].split(" ")[0].startswith(name)]
        assert samples, name
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? \S+$')
    assert all(sample.match(line) for line in lines if not line.startswith("#")), response.text

    after = server.metrics()
    assert after["pied:generation_tokens_total"] - before["pied:generation_tokens_total"] == 5
    assert after["pied:prompt_tokens_total"] > before["pied:prompt_tokens_total"]
    key = 'pied:request_success_total{finished_reason="length"}'
    assert after[key] - before.get(key, 0) == 1
    # The tiers are separate series: vLLM's name is the device's alone.
    assert "pied:kv_cache_usage_perc" in after and "pied:host_kv_cache_usage_perc" in after
    for histogram in (
        "time_to_first_token",
        "inter_token_latency",
        "e2e_request_latency",
        "request_queue_time",
    ):
        name = f"pied:{histogram}_seconds"
        buckets = [value for key, value in after.items() if key.startswith(f"{name}_bucket")]
        assert buckets == sorted(buckets), name  # cumulative
        assert after[f'{name}_bucket{{le="+Inf"}}'] == after[f"{name}_count"] > 0


def test_logit_bias_steers_greedy_output(client: openai.OpenAI, server: ServerProcess) -> None:
    greedy = dict(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, extra_body={"ignore_eos": True})
    plain = client.completions.create(**greedy).choices[0]
    [favourite] = server.request("POST", "/tokenize", {"prompt": " the", "add_special_tokens": False}).json()["tokens"]
    # +100 on one token: the greedy pick every step (OpenAI's range; past it is clamped, as vLLM does).
    for bias in (100, 1e6):
        pushed = client.completions.create(**greedy, logit_bias={str(favourite): bias}).choices[0]
        assert pushed.text == " the" * 4
    # -100 on the first token greedy chose: never chosen; chat takes the same field.
    first = client.completions.create(**greedy, logprobs=0).choices[0].logprobs.tokens[0]
    [first_id] = server.request("POST", "/tokenize", {"prompt": first, "add_special_tokens": False}).json()["tokens"]
    banned = client.completions.create(**greedy, logprobs=0, logit_bias={str(first_id): -100}).choices[0]
    assert first not in banned.logprobs.tokens and banned.text != plain.text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=3,
        logit_bias={str(favourite): 100}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.choices[0].message.content == " the" * 3
