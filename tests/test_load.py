"""Load: 1,000 streaming requests from 200 concurrent clients against ``pied serve`` with the bundled
default model (worker processes, real HTTP). Every request completes without an error and each
greedy text is exactly what the same request gets when it runs alone; afterwards the server is
idle, its KV cache empty, and every request counted."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from server import ServerProcess, read_stream, running_server

from pied.default_model import default_model_dir

NUM_CLIENTS = 200
REQUESTS_PER_CLIENT = 5
MAX_TOKENS = 16
TOPICS = [
    "sorting a list", "reading a file", "a binary search", "recursion", "dictionaries", "a for loop",
    "exceptions", "classes", "generators", "string formatting", "sets", "list comprehensions",
]  # fmt: skip
DEVICE_USAGE = "pied:kv_cache_usage_perc"


def request_body(index: int) -> tuple[str, dict]:
    """Request ``index`` of the distinct ones: completions and chat, in turn, over the topics."""
    common = {"temperature": 0, "max_tokens": MAX_TOKENS, "stream": True}
    topic = TOPICS[index // 2 % len(TOPICS)]
    if index % 2 == 0:
        return "/v1/completions", {**common, "prompt": f"Here is how to write {topic} in Python:"}
    return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"Explain {topic}."}]}


NUM_DISTINCT = 2 * len(TOPICS)


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    with running_server(default_model_dir()) as process:
        yield process


async def test_1000_streams_from_200_clients(server: ServerProcess) -> None:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        expected = [
            await read_stream(session, server.base_url, *request_body(i)) for i in range(NUM_DISTINCT)
        ]
        before = server.metrics()

        async def client(number: int) -> list[tuple[int, tuple[str, str]]]:
            results = []
            for k in range(REQUESTS_PER_CLIENT):
                index = (number * REQUESTS_PER_CLIENT + k) % NUM_DISTINCT
                results.append((index, await read_stream(session, server.base_url, *request_body(index))))
            return results

        started = time.monotonic()
        per_client = await asyncio.gather(*(client(number) for number in range(NUM_CLIENTS)))
        elapsed = time.monotonic() - started

    results = [result for results in per_client for result in results]
    assert len(results) == NUM_CLIENTS * REQUESTS_PER_CLIENT
    mismatches = [(index, got, expected[index]) for index, got in results if got != expected[index]]
    assert not mismatches, f"{len(mismatches)} of {len(results)} differ from alone, e.g. {mismatches[:3]}"
    print(
        f"{len(results)} streams from {NUM_CLIENTS} clients in {elapsed:.1f} s ({len(results) / elapsed:.0f}/s)"
    )

    deadline = time.monotonic() + 10
    while (after := server.metrics())[DEVICE_USAGE] != 0 or after["pied:num_requests_running"] != 0:
        assert time.monotonic() < deadline, "the server did not go idle"
        await asyncio.sleep(0.05)
    finished = {name: value for name, value in after.items() if name.startswith("pied:request_success_total")}
    total = sum(finished.values()) - sum(
        v for n, v in before.items() if n.startswith("pied:request_success_total")
    )
    assert total == len(results), finished
    assert server.request("GET", "/health").status == 200
