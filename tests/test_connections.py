"""The connection cap on a real listening socket (aiohttp in this process, no model): an idle
connection gives way to a new one; when every connection is busy, the new one gets a 503."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from pied.api.connections import ConnectionLimit, LimitedTCPSite

MAX_CONNECTIONS = 3


async def serve(limit: ConnectionLimit) -> tuple[web.AppRunner, int, asyncio.Event]:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()  # busy until the test lets it go
        return web.Response(text="done")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[limit.track_requests])
    app.router.add_get("/slow", slow)
    app.router.add_get("/fast", fast)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = LimitedTCPSite(runner, "127.0.0.1", 0, limit, backlog=16)
    await site.start()
    return runner, site.port, release


async def get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def status_of(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    data = await asyncio.wait_for(reader.read(65536), 30)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_idle_connections_are_evicted_oldest_first() -> None:
    limit = ConnectionLimit(MAX_CONNECTIONS)
    runner, port, _ = await serve(limit)
    try:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        await asyncio.sleep(0)
        reader, writer = await get(port, "/fast")
        assert (await status_of(reader))[0] == 200
        assert limit.num_evicted == 1 and limit.num_refused == 0
        assert await asyncio.wait_for(idle[0][0].read(), 30) == b""  # the oldest was closed
        writer.close()
        for _, idle_writer in idle:
            idle_writer.close()
    finally:
        await runner.cleanup()


async def test_new_connection_is_refused_with_503_when_all_are_busy() -> None:
    limit = ConnectionLimit(MAX_CONNECTIONS)
    runner, port, release = await serve(limit)
    try:
        busy = [await get(port, "/slow") for _ in range(MAX_CONNECTIONS)]
        for _ in range(100):  # until every handler has started (bounded)
            if limit.num_busy == MAX_CONNECTIONS:
                break
            await asyncio.sleep(0.05)
        reader, writer = await get(port, "/fast")
        status, body = await status_of(reader)
        assert status == 503 and limit.num_refused == 1
        error = json.loads(body)["error"]
        assert error["code"] == 503 and error["type"] == "ServiceUnavailableError"
        writer.close()
        release.set()  # the busy ones still complete
        for busy_reader, busy_writer in busy:
            assert (await status_of(busy_reader))[0] == 200
            busy_writer.close()
    finally:
        await runner.cleanup()
