"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

The request asks for ``stream_options: {"include_usage": true}``, so the server's last chunk
reports the token counts the benchmark adds up; a server that sends no usage is an error for that
request (its counts would be guesses). A chunk that carries generated text is a token event: the
first sets TTFT, the rest give ITL. Chunks without text (a chat role announcement, a bare
finish_reason) are not, since no token reached the client with them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from pied.bench.datasets import SampleRequest
from pied.bench.metrics import RequestOutput

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)
ERROR_TEXT_LIMIT = 500


def request_body(
    endpoint: str,
    model: str,
    request: SampleRequest,
    temperature: float,
    ignore_eos: bool,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == CHAT_COMPLETIONS:
        body["messages"] = request.messages
        body["max_completion_tokens"] = request.output_len
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = request.output_len
    if ignore_eos:  # vLLM's and SGLang's extension; sent only when asked, for strict servers
        body["ignore_eos"] = True
    body.update(extra_body or {})
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text a chunk carries (completions ``text`` or chat ``delta.content``)."""
    text = ""
    for choice in chunk.get("choices") or ():
        if "text" in choice:
            text += choice.get("text") or ""
        delta = choice.get("delta") or {}
        text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return text


async def send_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> RequestOutput:
    """POST ``body`` to ``url`` and read its SSE stream to the end; never raises for a server or
    connection error, which is recorded in the output instead."""
    output = RequestOutput()
    usage: dict[str, Any] | None = None
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                text = (await response.text())[:ERROR_TEXT_LIMIT]
                output.error = f"HTTP {response.status}: {text}"
                return output
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:") :].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    output.error = f"stream error: {json.dumps(chunk['error'])[:ERROR_TEXT_LIMIT]}"
                    return output
                text = chunk_text(chunk)
                if text:
                    if not output.generated_text:
                        output.ttft = now - start
                    else:
                        output.itl.append(now - last)
                    output.generated_text += text
                    last = now
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as error:
        output.error = f"{type(error).__name__}: {error}"[:ERROR_TEXT_LIMIT]
        return output
    output.latency = time.perf_counter() - start
    if usage is None:
        output.error = "the stream carried no usage (stream_options.include_usage unsupported?)"
        return output
    if not output.generated_text:
        output.ttft = output.latency  # no text came (empty tokens): the first token was no later
    output.prompt_len = int(usage.get("prompt_tokens") or 0)
    output.output_tokens = int(usage.get("completion_tokens") or 0)
    output.success = True
    return output
