"""``/v1/responses`` (OpenAI's Responses API, text in and out) and ``/ping`` against a real
``pied serve`` through the official ``openai`` client: the response object, the streamed events in
OpenAI's order adding up to the same text, the same answer as chat completions (it is an adapter
over them), and 400s in OpenAI's shape naming the field."""

from __future__ import annotations

import openai
import pytest
from server import ServerProcess, api_server_fixtures

MODEL = "tiny-responses"
INSTRUCTIONS = "You are terse."
QUESTION = "Write a function that adds two numbers."
STREAM_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    # response.output_text.delta, one per piece of text
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


server, client = api_server_fixtures(MODEL)


def test_ping_is_health_for_get_and_post(server: ServerProcess) -> None:
    for method in ("GET", "POST"):
        assert server.request(method, "/ping").status == 200
    assert server.request("PUT", "/ping").status == 405


def test_response_matches_chat_and_its_stream(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, instructions=INSTRUCTIONS, max_output_tokens=12, temperature=0)
    response = client.responses.create(input=QUESTION, **kwargs)
    assert response.object == "response" and response.id.startswith("resp")
    assert response.model == MODEL
    # store true (OpenAI's default) is answered, with store false: nothing is kept (vLLM's way).
    stored = client.responses.create(input=QUESTION, store=True, **kwargs)
    assert stored.store is False and stored.output_text == response.output_text
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    text = response.output_text
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and 1 <= usage.output_tokens <= 12
    if usage.output_tokens == 12:
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None

    # An adapter over chat completions: the same greedy answer for the same conversation.
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
        max_completion_tokens=12,
        temperature=0,
    )
    assert chat.choices[0].message.content == text
    assert chat.usage.prompt_tokens == usage.input_tokens

    # The same input as a list of messages with content parts.
    listed = client.responses.create(
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}], **kwargs
    )
    assert listed.output_text == text

    events = list(client.responses.create(input=QUESTION, stream=True, **kwargs))
    kinds = [event.type for event in events]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert [kind for kind in kinds if kind != "response.output_text.delta"] == [
        *STREAM_EVENTS,
        f"response.{response.status}",
    ]
    assert kinds.index("response.output_text.done") > max(
        i for i, k in enumerate(kinds) if k == "response.output_text.delta"
    )
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(deltas) == text and len(deltas) > 1
    assert (
        events[-1].response.output_text == text
        and events[-1].response.usage.output_tokens == usage.output_tokens
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_bad_requests_are_openai_400s_naming_the_field(server: ServerProcess, fields, param) -> None:
    body = {"model": MODEL, "input": QUESTION, **fields}
    response = server.request("POST", "/v1/responses", body)
    assert response.status == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["param"] == param and error["message"], error
