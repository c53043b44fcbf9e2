"""``/metrics`` of a real ``pied serve`` (worker processes, a tiny model) read as Prometheus reads
it: parsed by ``prometheus_client``'s own parser, every series labelled with the served model's
name, the counters equal to the usage the responses reported, the histograms counting the requests
(the queue, prefill and decode phases measured by the scheduler), process metrics per worker."""

from __future__ import annotations

import json
import re
import time

from prometheus_client.parser import text_string_to_metric_families
from server import REPO, ServerProcess, api_server_fixtures

MODEL = "tiny-metrics"
PROMPT = "The class statement defines"
MESSAGES = [{"role": "user", "content": "Say something."}]
REQUEST_HISTOGRAMS = (
    "pied:time_to_first_token_seconds",
    "pied:e2e_request_latency_seconds",
    "pied:request_queue_time_seconds",
    "pied:request_prefill_time_seconds",
    "pied:request_decode_time_seconds",
    "pied:request_inference_time_seconds",
    "pied:request_prompt_tokens",
    "pied:request_generation_tokens",
)


server, client = api_server_fixtures(MODEL)


def scrape(server: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {labels: value}}``; asserts every sample is labelled with the model."""
    response = server.request("GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert sample.labels.get("model_name") == MODEL, sample
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0


def test_counters_equal_reported_usage_and_histograms_count_requests(client, server) -> None:
    before = scrape(server)
    usages = []
    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=5, extra_body={"ignore_eos": True}
    )
    usages.append(completion.usage)
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=7, extra_body={"ignore_eos": True}
    )
    usages.append(chat.usage)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    usages.append(chunks[-1].usage)
    num_requests = len(usages)
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pied:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("pied:generation_tokens_total") == sum(u.completion_tokens for u in usages) == 18
    assert delta("pied:prompt_tokens_cached_total") == sum(map(cached, usages))
    assert delta("pied:request_success_total", finished_reason="length") == num_requests
    for name in REQUEST_HISTOGRAMS:
        assert delta(f"{name}_count") == num_requests, name
        assert delta(f"{name}_bucket", le="+Inf") == num_requests, name
        assert delta(f"{name}_sum") > 0 or name == "pied:request_queue_time_seconds", name
    assert delta("pied:request_generation_tokens_sum") == 18
    # Every token after each request's first is an inter-token interval.
    assert delta("pied:inter_token_latency_seconds_count") == 18 - num_requests
    assert delta("pied:request_time_per_output_token_seconds_count") == num_requests
    # The steps ran every prompt token not found cached and every output token but the last. The
    # engine's snapshot reaches the API after the last delta: poll it until it is quiescent.
    computed = sum(u.prompt_tokens - cached(u) + u.completion_tokens - 1 for u in usages)
    deadline = time.monotonic() + 30
    while value(after, "pied:num_requests_running") or delta("pied:iteration_tokens_total_sum") != computed:
        assert time.monotonic() < deadline, (delta("pied:iteration_tokens_total_sum"), computed)
        time.sleep(0.05)
        after = scrape(server)
    assert delta("pied:iteration_tokens_total_count") >= max(u.completion_tokens for u in usages)


def test_engine_state_host_tier_and_process_series(client, server) -> None:
    samples = scrape(server)
    for name in (
        "pied:num_requests_running",
        "pied:num_requests_waiting",
        "pied:kv_cache_usage_perc",
        "pied:num_preemptions_total",
        "pied:prefix_cache_queries_total",
        "pied:prefix_cache_hits_total",
        "pied:host_kv_cache_usage_perc",
        "pied:host_kv_blocks_in_use",
        "pied:host_kv_lease_blocks",
        "pied:stall_seconds_total",
    ):
        assert () in samples[name], name  # one series, no tier label to sum over
    assert set(samples["pied:kv_bytes_transferred_total"]) == {
        (("direction", "host_to_device"),),
        (("direction", "device_to_host"),),
    }
    # The daemon's workers are processes: each has its own process series beside the API's.
    workers = {dict(labels)["worker"] for labels in samples["process_resident_memory_bytes"]}
    assert "api" in workers and "scheduler" in workers and len(workers) >= 3, workers
    assert all(v > 0 for v in samples["process_resident_memory_bytes"].values())


def test_every_series_the_dashboard_reads_is_exported(server) -> None:
    dashboard = json.loads((REPO / "packaging" / "grafana" / "pied.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    names = {name for expr in exprs for name in re.findall(r"pied:[a-z0-9_]+", expr)}
    assert names
    exported = set(scrape(server))
    assert names - exported == set()
