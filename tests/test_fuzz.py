"""Hostile input against a real ``pied serve``: thousands of malformed and boundary requests built
from the OpenAPI document the server publishes (wrong types, huge and negative numbers, unicode,
missing and extra fields, giant strings, bad JSON, wrong content types and methods), the request
limits, and a model folder whose chat template tries to loop forever, recurse, read files and
reach Python's internals. None of it may get a 5xx or stall the server, and afterwards the KV cache
is empty again.

Request bodies come from hypothesis strategies derived from the schemas in ``/openapi.json``: a
valid body first, then (usually) one mutation of it, so the server sees both what it must serve
and everything near it. The server runs with small limits (``max_tokens`` at most 2) so that the
thousands of requests that are valid stay cheap.
"""

from __future__ import annotations

import collections
import concurrent.futures
import http.client
import json
import math
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server import ServerProcess, running_server, sse_events

BODY_LIMIT = 256 * 1024
MAX_OUTPUT_TOKENS = 2
MAX_N = 3
MAX_CHOICES = 8
MAX_PROMPT_TOKENS = 64
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 16
DEVICE_USAGE = "pied:kv_cache_usage_perc"

FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)

# The model folder's chat template: the usual format, unless a message asks for something hostile.
HOSTILE_TEMPLATE = """
{%- for message in messages -%}
{%- set content = message['content'] if message['content'] is string else '' -%}
{%- if content == 'LOOP' -%}
  {%- for i in range(100000) -%}{%- for j in range(100000) -%}{%- endfor -%}{%- endfor -%}
{%- elif content == 'RECURSE' -%}
  {%- macro deeper(n) -%}{{ deeper(n + 1) }}{%- endmacro -%}{{ deeper(0) }}
{%- elif content == 'READ' -%}
  {%- include '/etc/passwd' -%}
{%- elif content == 'IMPORT' -%}
  {%- import 'os' as os -%}{{ os.system('touch MARKER') }}
{%- elif content == 'GLOBALS' -%}
  {{ cycler.__init__.__globals__.os.system('touch MARKER') }}
{%- elif content == 'SUBCLASSES' -%}
  {{ ''.__class__.__mro__[1].__subclasses__() }}
{%- elif content == 'BIG' -%}
  {{ 'x' * 1000000000 }}
{%- elif content == 'DOUBLING' -%}
  {%- set ns = namespace(s='x') -%}{%- for i in range(64) -%}{%- set ns.s = ns.s ~ ns.s -%}{%- endfor -%}{{ ns.s }}
{%- else -%}
  {{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}
"""
HOSTILE_CONTENTS = ["LOOP", "RECURSE", "READ", "IMPORT", "GLOBALS", "SUBCLASSES", "BIG", "DOUBLING"]


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file the hostile template would create if it could run a shell command."""
    return tmp_path_factory.mktemp("marker") / "pwned"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory, marker: Path) -> ServerProcess:
    model = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "chat_template.jinja").write_text(HOSTILE_TEMPLATE.replace("MARKER", str(marker)))
    flags = [
        "--max-request-body-bytes", str(BODY_LIMIT),
        "--max-output-tokens", str(MAX_OUTPUT_TOKENS),
        "--max-n", str(MAX_N),
        "--max-choices", str(MAX_CHOICES),
        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
        "--max-stop-strings", str(MAX_STOP_STRINGS),
        "--max-stop-string-chars", str(MAX_STOP_STRING_CHARS),
    ]  # fmt: skip
    with running_server(model, *flags) as process:
        yield process


# ---------------------------------------------------------------- a client that survives anything


class Client:
    """One keep-alive HTTP connection, reopened whenever the server closes it."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.connection: http.client.HTTPConnection | None = None
        self.statuses: collections.Counter[int] = collections.Counter()

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.server.host, self.server.port, timeout=30)
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                self.statuses[response.status] += 1
                return response.status, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                # A keep-alive connection the server closed meanwhile (after a 413, say): retry once.
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Client:
    http_client = Client(server)
    yield http_client
    http_client.close()


def check_answer(status: int, data: bytes, what: str) -> None:
    """No 5xx; errors in OpenAI's shape; a stream carries no error of the server's own making."""
    assert status < 500, f"{status} for {what}: {data[:500]!r}"
    if status >= 400 and data:
        error = json.loads(data)["error"]
        assert error["code"] == status and isinstance(error["message"], str), error
    if status == 200 and data.startswith(b"data: "):
        for event in sse_events(data):
            if isinstance(event, dict) and "error" in event:
                assert event["error"]["code"] < 500, f"{event} for {what}"


# ---------------------------------------------------------------- strategies from the schemas

SPECIAL_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",  # a lone surrogate: valid JSON escape, not valid unicode
    "\u202e\u200b\ufeff",
    "🙂" * 40,
    "<|im_start|>",
    "</s>",
    "{{ 7 * 7 }}{% for x in range(10) %}",
    "%s%n%x",
    "a" * 5_000,
    "x" * 300_000,  # past the body limit: 413
]
SPECIAL_INTEGERS = [
    0,
    -1,
    1,
    2,
    4096,
    2**31 - 1,
    2**31,
    -(2**31) - 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    -(2**64),
    10**40,
]
SPECIAL_NUMBERS = [0.0, -0.0, 5e-324, 1e-320, 1e-9, 0.9999999, 1.0000001, 2.0, -2.0, 1e308, -1e308, 2**64]

strings = st.one_of(st.text(max_size=24), st.sampled_from(SPECIAL_STRINGS))
integers = st.one_of(st.integers(-3, 80), st.sampled_from(SPECIAL_INTEGERS))
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(SPECIAL_NUMBERS), integers
)


def around(low: float, high: float, edges: list[float]) -> st.SearchStrategy[float]:
    """Numbers in ``[low, high]`` and the edges given (some just outside)."""
    return st.one_of(st.floats(low, high), st.sampled_from(edges))


# Sampling fields: drawn mostly from their valid ranges and edges (values of other types come from
# the mutations below), so that many requests reach the engine with unusual but valid parameters.
# max_tokens stays at most --max-output-tokens, so that those requests are cheap.
small_counts = st.one_of(st.integers(1, MAX_OUTPUT_TOKENS), st.sampled_from(SPECIAL_INTEGERS))
FIELD_STRATEGIES = {
    "max_tokens": small_counts,
    "max_completion_tokens": small_counts,
    "n": st.one_of(st.integers(1, MAX_N), st.sampled_from([0, -1, MAX_N + 1, 2**63])),
    "temperature": around(0, 2, [0.0, 5e-324, 1e-9, 2.0, 1e308, -1e-9]),
    "top_p": around(1e-9, 1, [5e-324, 1.0, 0.0, 1.0000001]),
    "top_k": st.one_of(st.integers(-1, 600), st.sampled_from([-2, 2**31, 2**63 - 1, 2**64 - 1, 10**30])),
    "min_p": around(0, 1, [0.0, 1.0, 1.5]),
    "presence_penalty": around(-2, 2, [-2.0, 2.0, 2.0000001]),
    "frequency_penalty": around(-2, 2, [-2.0, 2.0, -2.0000001]),
    "repetition_penalty": around(1e-6, 2, [5e-324, 2.0, 0.0, 1e308]),
    "min_tokens": st.one_of(st.integers(0, MAX_OUTPUT_TOKENS), st.sampled_from([-1, 2**63])),
    "seed": st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**63, -(2**63) - 1, 2**64])),
    "top_logprobs": st.one_of(st.integers(0, 20), st.sampled_from([21, -1, 2**40])),
    "logit_bias": st.one_of(
        st.none(), st.dictionaries(st.integers(0, 300).map(str), st.floats(-1e3, 1e3), max_size=4)
    ),
    # Features pied refuses (a 400 each): left to the mutations, or every other request would be refused.
    "suffix": st.none(),
    "best_of": st.none(),
}
# Fields generated in every valid body: a completion without max_tokens asks for 16 (OpenAI's
# default), past this server's limit.
ALWAYS_PRESENT = {"CompletionRequest": {"max_tokens"}}
json_values = st.recursive(
    st.none() | st.booleans() | integers | numbers | strings,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def from_schema(
    schema: dict[str, Any],
    components: dict[str, Any],
    fields: dict[str, st.SearchStrategy[Any]],
    depth: int = 0,
) -> st.SearchStrategy[Any]:
    """Values that match ``schema`` (JSON Schema as msgspec writes it), leaning on boundaries;
    object properties named in ``fields`` are drawn from there (or null) instead."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(components[name], components, fields, depth + 1))
    if "anyOf" in schema:
        return st.one_of([from_schema(option, components, fields, depth) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties")
        if properties is None or depth > 4:
            return st.dictionaries(st.text(max_size=8), json_values, max_size=3)
        required = set(schema.get("required", [])) | ALWAYS_PRESENT.get(schema.get("title", ""), set())
        values = {
            name: st.one_of(fields[name], st.none())
            if name in fields
            else from_schema(sub, components, fields, depth + 1)
            for name, sub in properties.items()
        }
        return st.fixed_dictionaries(
            {name: values[name] for name in values if name in required},
            optional={name: values[name] for name in values if name not in required},
        )
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), components, fields, depth + 1), max_size=4)
    if kind == "string":
        return strings
    if kind == "integer":
        return integers
    if kind == "number":
        return numbers
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values


def paths_in(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indexes) to a value inside ``value``, itself included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_in(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths_in(item, (*prefix, index))
    return found


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(copy[path[0]], path[1:], new)
    return copy


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]], required: list[str]) -> Any:
    """A valid body, or one mutation of it: a value of any type anywhere, a required field
    missing, an unknown field, or no object at all."""
    body = draw(valid)
    mutation = draw(
        st.sampled_from(["none", "none", "anywhere", "anywhere", "drop", "extra", "not-an-object"])
    )
    if mutation == "anywhere":
        path = draw(st.sampled_from(paths_in(body)))
        return replaced(body, path, draw(json_values))
    if mutation == "drop" and required:
        body = dict(body)
        body.pop(draw(st.sampled_from(required)), None)
    elif mutation == "extra":
        body = {**body, draw(st.text(min_size=1, max_size=12)): draw(json_values)}
    elif mutation == "not-an-object":
        return draw(json_values)
    return body


def encode(body: Any, ascii_only: bool) -> bytes:
    # Lone surrogates cannot be UTF-8: such bodies always go \\u-escaped.
    try:
        return json.dumps(body, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:
        return json.dumps(body).encode()


@pytest.fixture(scope="module")
def operations(client: Client) -> dict[str, st.SearchStrategy[Any]]:
    """``{path: strategy of request bodies}`` for every POST operation in ``/openapi.json``."""
    status, data = client.send("GET", "/openapi.json", None, {})
    assert status == 200
    document = json.loads(data)
    components = document["components"]["schemas"]
    status, data = client.send("GET", "/v1/models", None, {})
    model_name = json.loads(data)["data"][0]["id"]
    # The served model's name, mostly: a wrong one is a 404 before anything else is looked at.
    fields = {**FIELD_STRATEGIES, "model": st.one_of(st.just(model_name), st.just(model_name), strings)}
    strategies = {}
    for path, methods in document["paths"].items():
        request_body = methods.get("post", {}).get("requestBody")
        if request_body is None:
            continue
        schema = request_body["content"]["application/json"]["schema"]
        name = schema["$ref"].rsplit("/", 1)[-1]
        strategies[path] = mutated(
            from_schema(schema, components, fields), components[name].get("required", [])
        )
    assert set(strategies) >= {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"}
    return strategies


# ---------------------------------------------------------------- the fuzz tests


def fuzz_operation(client: Client, operations: dict, path: str, examples: int) -> None:
    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        body = data.draw(operations[path], label="body")
        raw = encode(body, ascii_only=data.draw(st.booleans(), label="ascii"))
        status, answer = client.send("POST", path, raw, {"Content-Type": "application/json"})
        check_answer(status, answer, f"POST {path} {raw[:300]!r}")

    run()


@pytest.mark.parametrize(
    "path, examples",
    [
        ("/v1/completions", 1200),
        ("/v1/chat/completions", 1200),
        ("/v1/responses", 400),
        ("/tokenize", 400),
        ("/detokenize", 200),
    ],
)
def test_fuzz_request_bodies(client: Client, operations: dict, path: str, examples: int) -> None:
    fuzz_operation(client, operations, path, examples)


RAW_BODIES = [
    b"",
    b"{",
    b'{"prompt": ',
    b"null",
    b"[]",
    b'"just a string"',
    b"\xff\xfe\x00",
    b'{"prompt": "a", "max_tokens": NaN}',
    b'{"prompt": "a", "temperature": Infinity}',
    b'{"prompt": "a", "max_tokens": 1e999999}',
    b'{"prompt": "a", "prompt": 7}',
    b'\xef\xbb\xbf{"prompt": "bom"}',
    b'{"prompt": "\xc3\x28"}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"prompt": [' + b"1," * 40_000 + b"1]}",
]


@settings(FUZZ_SETTINGS, max_examples=400)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize"]),
    body=st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=64)),
    cut=st.integers(0, 60),
)
def test_fuzz_raw_bytes(client: Client, path: str, body: bytes, cut: int) -> None:
    for raw in (body, body[:cut]):  # and truncated
        status, answer = client.send("POST", path, raw, {"Content-Type": "application/json"})
        check_answer(status, answer, f"POST {path} {raw[:100]!r}")


CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
]


@settings(FUZZ_SETTINGS, max_examples=200)
@given(
    content_type=st.sampled_from(CONTENT_TYPES),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(
        [
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/responses",
            "/tokenize",
            "/detokenize",
            "/v1/models",
            "/v1/models/x",
            "/ping",
            "/health",
            "/metrics",
            "/version",
            "/openapi.json",
            "/v1/models/%00",
            "/../etc/passwd",
            "/v1//completions",
            "/v1/completions?stream=true",
            "/" + "a" * 4000,
        ]
    ),  # fmt: skip
)
def test_fuzz_methods_paths_and_content_types(
    client: Client, content_type: str | None, method: str, path: str
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = b'{"prompt": "Hello", "max_tokens": 1}' if method in ("POST", "PUT", "PATCH") else None
    status, answer = client.send(method, path, body, headers)
    check_answer(status, answer, f"{method} {path} {content_type}")


def test_malformed_http(server: ServerProcess) -> None:
    """Requests no HTTP library would send: the server answers 4xx (or closes) and lives on."""
    requests = [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n0\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}{}{}",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /health HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
    ]
    for raw in requests:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if answer:
            status = int(answer.split(b" ", 2)[1])
            assert status < 500, (raw[:80], answer[:200])
    assert server.request("GET", "/health").status == 200


# ---------------------------------------------------------------- limits and the hostile template


def post(client: Client, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, data = client.send("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return status, json.loads(data)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "Hi", "n": MAX_N + 1}, "n"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": MAX_OUTPUT_TOKENS + 1}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3},
         "max_completion_tokens"),
        ("/v1/completions", {"prompt": "word " * 200, "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2]] * 3, "n": 3, "max_tokens": 1}, "prompt"),  # 9 choices
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "stop": "s" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "seed": 2**64}, "seed"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "stop_token_ids": [2**40]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "Hi"}, "max_tokens"),  # 16 by default: past the limit
    ],
)  # fmt: skip
def test_limits(client: Client, path: str, body: dict[str, Any], param: str) -> None:
    status, answer = post(client, path, body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_limits_allow_what_is_within_them(client: Client) -> None:
    body = {"prompt": [[1, 2]] * 2, "n": MAX_N, "stop": ["a"] * 4, "max_tokens": MAX_OUTPUT_TOKENS}
    status, answer = post(client, "/v1/completions", body)
    assert status == 200 and len(answer["choices"]) == 2 * MAX_N
    # A chat request without max_tokens gets --max-output-tokens, not the rest of the context.
    body = {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    status, answer = post(client, "/v1/chat/completions", body)
    assert status == 200 and answer["usage"]["completion_tokens"] == MAX_OUTPUT_TOKENS, answer


def test_hostile_chat_template(client: Client, server: ServerProcess, marker: Path) -> None:
    def chat(content: str) -> tuple[int, dict[str, Any], float]:
        started = time.monotonic()
        status, answer = post(
            Client(server), "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]}
        )
        return status, answer, time.monotonic() - started

    status, answer, _ = chat("Hello")  # the template renders ordinary conversations
    assert status == 200, answer
    with concurrent.futures.ThreadPoolExecutor(len(HOSTILE_CONTENTS)) as pool:
        hostile = {content: pool.submit(chat, content) for content in HOSTILE_CONTENTS}
        # While templates run to their deadline, everything else is served: both answers come
        # back before the endless loop's template has been cut off (its deadline is seconds long).
        assert client.send("GET", "/health", None, {})[0] == 200
        status, _ = post(client, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
        assert status == 200
        assert not hostile["LOOP"].done(), "a slow chat template stalled the other requests"
        for content, future in hostile.items():
            status, answer, seconds = future.result(timeout=30)
            assert status == 400 and answer["error"]["param"] == "messages", (content, answer)
            assert "chat template" in answer["error"]["message"]
            assert seconds < 10, (content, seconds)
    assert not marker.exists(), "the chat template ran a shell command"


# ---------------------------------------------------------------- afterwards


def test_zz_server_is_healthy_and_kv_cache_empty_afterwards(client: Client, server: ServerProcess) -> None:
    """Runs last (file order): nothing above crashed the server or leaked KV blocks."""
    assert server.process.poll() is None
    assert client.send("GET", "/health", None, {})[0] == 200
    deadline = time.monotonic() + 15
    while True:
        samples = server.metrics()
        if samples[DEVICE_USAGE] == 0 and samples["pied:num_requests_running"] == 0:
            break
        assert time.monotonic() < deadline, (
            f"KV blocks still in use after the fuzzing: {samples[DEVICE_USAGE]}"
        )
        time.sleep(0.1)
    assert not math.isnan(samples[DEVICE_USAGE])
    print(f"answers by status: {dict(sorted(client.statuses.items()))}")
