"""``pied bench serve``: the metric math and the samplers in isolation, then against a real
``pied serve`` (subprocess, HTTP, a tiny model): the token totals it reports are exactly the
server's counters, its TTFT and ITL agree with the server's own histograms, 4xx answers are counted
as errors, and the CLI writes the documented JSON without drawing a progress bar into a pipe."""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from server import REPO, ServerProcess, running_server

from pied.bench import BenchmarkConfig, run_benchmark
from pied.bench.client import request_body
from pied.bench.datasets import (
    DEFAULT_TOKEN_ID_RANGE,
    Vocabulary,
    sample_prefix,
    sample_random,
    sample_sharegpt,
)
from pied.bench.metrics import RequestOutput, calculate_metrics, parse_goodput, parse_percentiles
from pied.bench.serve import arrival_gaps, build_requests
from pied.default_model import default_model_dir
from pied.metrics import ITL_BUCKETS, TTFT_BUCKETS

MODEL = "tiny-bench"
SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "Explain how a for loop iterates over a list in Python."},
        {"from": "gpt", "value": "It calls iter() on the list, then next() until StopIteration."},
    ]},
    {"id": "b", "conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "What does the with statement guarantee about files?"},
        {"from": "gpt", "value": "That the file is closed when the block exits, even on errors."},
    ]},
    {"id": "c", "conversations": [{"from": "human", "value": "A lone turn with no reply is skipped."}]},
    {"id": "d", "conversations": [
        {"from": "human", "value": "Name the keyword that defines a generator function body."},
        {"from": "gpt", "value": "yield: a function whose body yields returns a generator."},
    ]},
]  # fmt: skip
RESULT_KEYS = {
    "date", "backend", "model_id", "endpoint", "dataset", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "duration", "completed", "failed", "first_error", "total_input_tokens",
    "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
    "request_goodput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
    "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms",
    "median_e2el_ms", "p99_e2el_ms",
}  # fmt: skip


# ---------------------------------------------------------------- metric math


def output(ttft: float, latency: float, tokens: int, itl: list[float], prompt_len: int = 10) -> RequestOutput:
    return RequestOutput(True, prompt_len, tokens, ttft, itl, latency, "x" * tokens)


def test_metrics_match_hand_computed_values() -> None:
    outputs = [
        output(0.1, 1.1, 11, [0.1] * 10),  # tpot 100 ms
        output(0.3, 0.7, 5, [0.1] * 4),  # tpot 100 ms
        output(0.2, 0.2, 1, []),  # one token: no tpot
        RequestOutput(error="HTTP 404: nope"),
    ]
    metrics = calculate_metrics(outputs, duration=2.0, percentiles=[50, 99, 99.9], slos={"ttft": 250})
    assert metrics["completed"] == 3 and metrics["failed"] == 1
    assert metrics["total_input_tokens"] == 30 and metrics["total_output_tokens"] == 17
    assert metrics["request_throughput"] == 1.5
    assert metrics["output_throughput"] == 8.5 and metrics["total_token_throughput"] == 23.5
    assert metrics["mean_ttft_ms"] == pytest.approx(200) and metrics["median_ttft_ms"] == pytest.approx(200)
    assert metrics["std_ttft_ms"] == pytest.approx(np.std([100, 300, 200]))
    # Linear interpolation between the order statistics 100, 200, 300 (numpy's and vLLM's rule).
    assert metrics["p99_ttft_ms"] == pytest.approx(298)
    assert metrics["p99.9_ttft_ms"] == pytest.approx(299.8)
    assert metrics["p50_e2el_ms"] == pytest.approx(700)
    assert metrics["mean_tpot_ms"] == pytest.approx(100)  # over the two requests that have one
    assert metrics["mean_itl_ms"] == pytest.approx(100) and metrics["p99_itl_ms"] == pytest.approx(100)
    # Goodput: TTFT <= 250 ms holds for 0.1 s and 0.2 s, not 0.3 s; the failed request never counts.
    assert metrics["request_goodput"] == 1.0


def test_goodput_needs_every_slo() -> None:
    outputs = [output(0.1, 1.1, 11, [0.1] * 10), output(0.1, 2.1, 11, [0.2] * 10)]
    assert calculate_metrics(outputs, 1.0, slos={"tpot": 150})["request_goodput"] == 1.0
    assert calculate_metrics(outputs, 1.0, slos={"tpot": 250, "e2el": 1500})["request_goodput"] == 1.0
    assert calculate_metrics(outputs, 1.0, slos={"tpot": 250, "e2el": 3000})["request_goodput"] == 2.0
    assert "request_goodput" not in calculate_metrics(outputs, 1.0)


def test_no_successes_gives_zeros_not_a_crash() -> None:
    metrics = calculate_metrics([RequestOutput(error="boom")], 1.0)
    assert metrics["completed"] == 0 and metrics["mean_ttft_ms"] == 0.0


@pytest.mark.parametrize(
    "items, message",
    [(["ttfb:10"], "ttft, tpot or e2el"), (["ttft"], "NAME:MILLISECONDS"), (["tpot:-1"], "positive")],
)
def test_bad_goodput_is_a_clear_error(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_goodput(items)


def test_percentile_parsing() -> None:
    assert parse_percentiles("50, 90,99.9") == [50.0, 90.0, 99.9]
    for bad in ("0", "101", "p99", ""):
        with pytest.raises(ValueError, match="metric-percentiles"):
            parse_percentiles(bad)


# ---------------------------------------------------------------- samplers and arrivals


def test_random_lengths_and_seeds() -> None:
    requests = sample_random(200, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    prompt_lens = [len(request.prompt) for request in requests]
    assert prompt_lens == [request.prompt_len for request in requests]  # ids: exactly the length meant
    assert min(prompt_lens) >= 50 and max(prompt_lens) <= 150 and len(set(prompt_lens)) > 20
    assert all(10 <= request.output_len <= 30 for request in requests)
    assert all(DEFAULT_TOKEN_ID_RANGE[0] <= t < DEFAULT_TOKEN_ID_RANGE[1] for r in requests for t in r.prompt)
    # The chat form has one word per token meant.
    assert all(len(r.messages[0]["content"].split()) == r.prompt_len for r in requests)
    assert sample_random(200, 100, 20, 0.5, seed=3) == requests
    assert sample_random(200, 100, 20, 0.5, seed=4) != requests
    fixed = sample_random(5, 64, 8, 0.0)
    assert {len(r.prompt) for r in fixed} == {64} and {r.output_len for r in fixed} == {8}
    with pytest.raises(ValueError, match="range-ratio"):
        sample_random(1, 10, 10, range_ratio=1.0)
    with pytest.raises(ValueError, match="--random-output-len must be at least 1"):
        sample_random(1, 10, 0)


@pytest.mark.e2e
def test_random_with_a_tokenizer_hits_lengths(tiny_model_dir) -> None:
    vocabulary = Vocabulary(tiny_model_dir("llama"))
    requests = sample_random(20, 30, 5, seed=0, vocabulary=vocabulary)
    special = set(range(5))  # tiny_models.SPECIAL_TOKENS
    assert all(len(r.prompt) == 30 and not special & set(r.prompt) for r in requests)
    # The chat form's text re-encodes to the length meant (give or take a merge across a join).
    lengths = [vocabulary.count(r.messages[0]["content"]) for r in requests]
    assert all(abs(length - 30) <= 1 for length in lengths), lengths
    assert sum(length == 30 for length in lengths) >= 15, lengths


def test_sharegpt_sampler(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))
    requests = sample_sharegpt(path, 6, seed=1)
    prompts = {turns["conversations"][-2]["value"] for turns in SHAREGPT if len(turns["conversations"]) > 1}
    assert {r.prompt for r in requests} == prompts  # three usable conversations, repeated to 6
    assert len(requests) == 6 and requests[:3] == requests[3:]
    for request in requests:
        reply = next(
            t["conversations"][-1]["value"]
            for t in SHAREGPT
            if len(t["conversations"]) > 1 and t["conversations"][-2]["value"] == request.prompt
        )
        assert request.output_len == -(-len(reply) // 4)  # four characters a token without a tokenizer
        assert request.messages == [{"role": "user", "content": request.prompt}]
    assert sample_sharegpt(path, 6, seed=1) == requests
    assert {r.output_len for r in sample_sharegpt(path, 3, output_len=7)} == {7}
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="JSON list"):
        sample_sharegpt(tmp_path / "bad.json", 1)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no conversation"):
        sample_sharegpt(tmp_path / "empty.json", 1)


def test_prefix_sampler_shares_the_system_prompt_and_grows_turn_by_turn() -> None:
    requests = sample_prefix(10, system_len=16, num_turns=3, turn_len=4, output_len=5, seed=0)
    assert len(requests) == 10
    system = requests[0].prompt[:16]
    assert all(r.prompt[:16] == system and r.messages[0]["role"] == "system" for r in requests)
    # Turn-major: 4 conversations' first turns, then their second turns (each extending the first).
    assert [r.prompt_len for r in requests] == [20] * 4 + [29] * 4 + [38] * 2
    for first, second in zip(requests[:4], requests[4:8]):
        assert second.prompt[:20] == first.prompt
        assert second.messages[:2] == first.messages and second.messages[2]["role"] == "assistant"
    assert sample_prefix(10, 16, 3, 4, 5, seed=0) == requests
    with pytest.raises(ValueError, match="--prefix-num-turns"):
        sample_prefix(1, num_turns=0)


def test_arrival_gaps() -> None:
    assert not arrival_gaps(5, float("inf"), 1.0, 0).any()
    for burstiness in (1.0, 0.25):
        gaps = arrival_gaps(40_000, 4.0, burstiness, seed=0)
        assert gaps.mean() == pytest.approx(0.25, rel=0.05)
        # A gamma's squared coefficient of variation is 1 / shape: 1 for Poisson, 4 when bursty.
        assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(1 / burstiness, rel=0.1)
    assert (arrival_gaps(10, 2.0, 1.0, 7) == arrival_gaps(10, 2.0, 1.0, 7)).all()


def test_request_bodies() -> None:
    request = sample_random(1, 4, 3)[0]
    body = request_body("/v1/completions", "m", request, temperature=0.5, ignore_eos=False)
    assert body == {
        "model": "m", "temperature": 0.5, "stream": True, "stream_options": {"include_usage": True},
        "prompt": request.prompt, "max_tokens": 3,
    }  # fmt: skip
    chat = request_body("/v1/chat/completions", "m", request, 0.0, ignore_eos=True, extra_body={"top_k": 5})
    assert chat["messages"] == request.messages and chat["max_completion_tokens"] == 3
    assert chat["ignore_eos"] is True and chat["top_k"] == 5 and "prompt" not in chat


def test_command_line_to_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from pied.bench.command import config_from_args
    from pied.cli import build_parser

    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    args = build_parser().parse_args(
        ["bench", "serve", "--base-url", "http://h:1/v1", "--dataset", "sharegpt", "s.json", "--goodput",
         "ttft:100", "--slo-tpot", "20", "--request-rate", "inf", "--extra-body", '{"top_p": 0.9}',
         "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "90,99.9"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.dataset, config.dataset_path, config.api_key) == ("sharegpt", "s.json", "from-env")
    assert config.goodput == {"ttft": 100.0, "tpot": 20.0} and config.request_rate == float("inf")
    assert config.extra_body == {"top_p": 0.9} and config.url == "http://h:1/v1/completions"
    assert config.percentile_metrics == ("ttft", "e2el") and config.metric_percentiles == (90.0, 99.9)
    for flags, message in (
        (["--extra-body", "[1]"], "JSON object"),
        (["--dataset", "random", "x.json"], "--dataset: expected"),
        (["--percentile-metrics", "ttft,foo"], "percentile-metrics"),
        (["--base-url", "localhost:8000"], "--base-url must look like"),
    ):
        argv = ["bench", "serve", "--base-url", "http://h:1", *flags]
        with pytest.raises(ValueError, match=message):
            config_from_args(build_parser().parse_args(argv))


# ---------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    # The bundled model (4M parameters, trained): its replies are text, so almost every token reaches
    # the client in its own chunk. A random model emits lone bytes of multibyte characters, which
    # the server holds back, so the client would see first text later than the first token.
    model = default_model_dir()
    with running_server(model, "--served-model-name", MODEL, "--max-model-len", "256") as process:
        yield process


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> tuple[float, int]:
    count = int(after[f"{name}_count"] - before[f"{name}_count"])
    return (after[f"{name}_sum"] - before[f"{name}_sum"]) / count, count


def bucket_width(buckets: tuple[float, ...], value: float) -> float:
    """The width of the histogram bucket that holds ``value``."""
    index = bisect.bisect_left(buckets, value)
    return buckets[index] - (buckets[index - 1] if index else 0.0)


@pytest.mark.e2e
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_counts_and_latencies_agree_with_the_server(server: ServerProcess, endpoint: str) -> None:
    config = BenchmarkConfig(
        base_url=server.base_url,
        model=MODEL,
        endpoint=endpoint,
        num_prompts=8,
        random_input_len=24,
        random_output_len=12,
        random_range_ratio=0.5,
        ignore_eos=True,
        max_concurrency=4,
        seed=5,
    )
    before = server.metrics()
    result = asyncio.run(run_benchmark(config))
    after = server.metrics()
    metrics = result.metrics
    assert metrics["completed"] == 8 and metrics["failed"] == 0, result.first_error
    # Exactly the tokens the server counted, in and out.
    assert (
        metrics["total_input_tokens"]
        == after["pied:prompt_tokens_total"] - before["pied:prompt_tokens_total"]
    )
    generated = after["pied:generation_tokens_total"] - before["pied:generation_tokens_total"]
    assert metrics["total_output_tokens"] == generated
    # ignore_eos: every request generates its max_tokens, so usage was read per request.
    expected_outputs = [request.output_len for request in build_requests(config)]
    assert [output.output_tokens for output in result.outputs] == expected_outputs
    if endpoint == "/v1/completions":  # token-id prompts: the server saw exactly the ids sent
        assert [output.prompt_len for output in result.outputs] == [
            r.prompt_len for r in build_requests(config)
        ]
    # TTFT and ITL agree with the server's histograms within the width of the bucket they fall in.
    server_ttft, count = histogram_mean(before, after, "pied:time_to_first_token_seconds")
    assert count == 8
    client_ttft = metrics["mean_ttft_ms"] / 1000
    # The server's clock starts once the body is read (rendering the chat template and tokenizing
    # included) and stops at the first token; the client's starts before it sends and stops after
    # it reads the first text. So never sooner, and later only by the request's trip in and the
    # chunk's trip out: within the width of the bucket the server's time falls in, or 50 ms where
    # that is less (a shared CI machine once delayed the client's reads of 8 requests by 22 ms on
    # average, past a 10 ms bucket; the trips themselves take 3-4 ms, perf/stream_lag.py).
    width = max(bucket_width(TTFT_BUCKETS, server_ttft), 0.05)
    assert server_ttft <= client_ttft <= server_ttft + width, (client_ttft, server_ttft)
    # Time per token after the first: the client's chunk gaps over the tokens they brought. (A
    # chunk may carry more than one token when the stream lags behind the engine; the server then
    # counts one inter-token latency per token, the client one gap per chunk, so their plain means
    # differ while the time they cover is the same.)
    server_itl, count = histogram_mean(before, after, "pied:inter_token_latency_seconds")
    assert count == generated - 8  # every token after each request's first
    client_itl = sum(sum(output.itl) for output in result.outputs) / count
    # Each chunk is written as its tokens arrive (chat and completions alike, measured per chunk in
    # perf/stream_lag.py), so the time the gaps cover differs only by how much later the last
    # chunk reached the client than the first: within the width of the bucket.
    width = bucket_width(ITL_BUCKETS, server_itl)
    assert abs(client_itl - server_itl) <= width, (client_itl, server_itl)


def bench_command(server: ServerProcess, *flags: str) -> list[str]:
    return [sys.executable, "-m", "pied", "bench", "serve", "--base-url", server.base_url, *flags]


@pytest.mark.e2e
def test_cli_sharegpt_end_to_end_writes_the_documented_json(server: ServerProcess, tmp_path: Path) -> None:
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(SHAREGPT))
    result_file = tmp_path / "result.json"
    before = server.metrics()
    done = subprocess.run(
        bench_command(
            server,
            "--model",
            MODEL,
            "--endpoint",
            "/v1/chat/completions",
            "--dataset",
            "sharegpt",
            str(dataset),
            "--num-prompts",
            "6",
            "--request-rate",
            "20",
            "--goodput",
            "ttft:60000",
            "tpot:60000",
            "--metric-percentiles",
            "50,99",
            "--result-file",
            str(result_file),
        ),  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    after = server.metrics()
    assert done.returncode == 0, done.stderr
    result = json.loads(result_file.read_text())
    assert RESULT_KEYS <= set(result), RESULT_KEYS - set(result)
    assert (
        result["backend"] == "openai-chat"
        and result["dataset"] == "sharegpt"
        and result["request_rate"] == 20
    )
    assert result["completed"] == 6 and result["failed"] == 0 and result["first_error"] is None
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # SLOs generous
    assert (
        result["total_output_tokens"]
        == after["pied:generation_tokens_total"] - before["pied:generation_tokens_total"]
    )
    assert (
        result["total_input_tokens"] == after["pied:prompt_tokens_total"] - before["pied:prompt_tokens_total"]
    )
    assert "p50_ttft_ms" in result and "Serving Benchmark Result" in done.stdout
    assert "Successful requests:                    6 " in done.stdout
    # Not a terminal: no progress bar anywhere.
    assert "requests [" not in done.stderr + done.stdout and "\r" not in done.stderr + done.stdout


@pytest.mark.e2e
def test_4xx_answers_are_counted_as_errors(server: ServerProcess, tmp_path: Path) -> None:
    result_file = tmp_path / "result.json"
    done = subprocess.run(
        bench_command(
            server,
            "--model",
            "not-served",
            "--num-prompts",
            "3",
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
            "--result-file",
            str(result_file),
        ),  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1  # every request failed
    result = json.loads(result_file.read_text())
    assert result["completed"] == 0 and result["failed"] == 3
    assert result["first_error"].startswith("HTTP 404") and "not-served" in result["first_error"]
    assert "First error: HTTP 404" in done.stdout


@pytest.mark.e2e
def test_progress_bar_only_on_a_terminal(server: ServerProcess) -> None:
    """With stdout and stderr on a terminal the bar is drawn; the pipe case is checked above.
    (No --model: the benchmark asks the server's /v1/models.)"""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        bench_command(
            server,
            "--num-prompts",
            "2",
            "--random-input-len",
            "8",
            "--random-output-len",
            "4",
        ),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        seen += data
    assert process.wait(timeout=120) == 0, seen
    os.close(leader)
    assert b"requests [" in seen and b"2/2" in seen, seen


@pytest.mark.e2e
def test_bad_flags_are_clear_errors(server: ServerProcess, tmp_path: Path) -> None:
    cases = [
        (["--dataset", "sharegpt"], "needs --dataset-path"),
        (["--dataset", "sharegpt", str(tmp_path / "missing.json")], "no file at"),
        (["--dataset", "alpaca"], "--dataset must be one of"),
        (["--request-rate", "0"], "--request-rate must be positive"),
        (["--goodput", "ttft:x"], "NAME:MILLISECONDS"),
    ]
    for flags, message in cases:
        done = subprocess.run(
            bench_command(server, "--model", MODEL, *flags),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)


@pytest.mark.e2e
def test_prefix_stream_with_an_api_key(tmp_path: Path) -> None:
    """A server that wants a key: OPENAI_API_KEY is sent (a run without it is all 401s), and the
    shared-prefix stream's token-id prompts reach the server exactly."""
    with running_server(default_model_dir(), "--served-model-name", MODEL, "--api-key", "sesame") as server:
        flags = [
            "--model", MODEL, "--dataset", "prefix", "--num-prompts", "6", "--prefix-system-len", "24",
            "--prefix-num-turns", "2", "--prefix-turn-len", "4", "--prefix-output-len", "3", "--ignore-eos",
        ]  # fmt: skip
        environment = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
        results = {}
        for name, key in (("with", "sesame"), ("without", None)):
            result_file = tmp_path / f"{name}.json"
            env = environment if key is None else {**environment, "OPENAI_API_KEY": key}
            subprocess.run(
                [*bench_command(server, *flags), "--result-file", str(result_file)],
                cwd=REPO,
                env=env,
                capture_output=True,
                timeout=300,
            )
            results[name] = json.loads(result_file.read_text())
    assert results["with"]["completed"] == 6, results["with"]["first_error"]
    # Three conversations: turn 1 is 24 + 4 ids, turn 2 adds the synthetic reply (3) and a turn (4).
    assert results["with"]["total_input_tokens"] == 3 * 28 + 3 * 35
    assert results["with"]["total_output_tokens"] == 6 * 3
    assert results["without"]["failed"] == 6 and results["without"]["first_error"].startswith("HTTP 401")
