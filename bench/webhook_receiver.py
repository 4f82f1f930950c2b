"""The outgoing-webhooks benchmark's receiver and its raw-HTTP baseline, each its own process (so
their CPU is counted apart from the worker's), both on uvloop like the worker.

`python -m bench.webhook_receiver serve PORT`: an aiohttp server that answers every POST 200 at
once and records (path, webhook-id, receipt time.time()) in memory, except under /hang/, where a
request is never answered (a dead endpoint that keeps the connection open: the sender's timeout
is what frees it). The benchmark reads what it got through GET /_count and GET /_results?path=,
and clears it with POST /_reset.

`python -m bench.webhook_receiver post URL N CONCURRENCY BODY_BYTES`: raw aiohttp client POSTs
(N of them, CONCURRENCY in flight, headers shaped like a signed webhook but not signed), prints
`RATE <requests/s>`: the ceiling of the HTTP part on this machine.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter

import aiohttp
import orjson
import uvloop
from aiohttp import web


def serve(port: int) -> None:
    """Answer 200 and record every POST until killed."""
    got: list[tuple[str, str, float]] = []

    async def hook(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        await request.read()
        got.append((path, request.headers.get("webhook-id", ""), time.time()))
        if path.startswith("hang/"):
            await asyncio.sleep(3600)  # the dead endpoint being simulated: never answers
        return web.Response(text="ok")

    async def count(_: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(Counter(p for p, _, _ in got)), content_type="application/json")

    async def results(request: web.Request) -> web.Response:
        path = request.query["path"]
        rows = [(i, t) for p, i, t in got if p == path]
        return web.Response(body=orjson.dumps(rows), content_type="application/json")

    async def reset(_: web.Request) -> web.Response:
        got.clear()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/_count", count)
    app.router.add_get("/_results", results)
    app.router.add_post("/_reset", reset)
    app.router.add_post("/{path:.*}", hook)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def post(url: str, n: int, concurrency: int, size: int) -> float:
    """Requests per second of n raw POSTs, `concurrency` in flight over one pooled session."""
    body = orjson.dumps({"type": "bench.event", "id": "x", "timestamp": "t", "data": {"pad": "x" * size}})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        next_i = 0

        async def lane() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                headers = {
                    "content-type": "application/json",
                    "webhook-id": f"raw_{i}",
                    "webhook-timestamp": str(int(time.time())),
                    "webhook-signature": "v1," + "A" * 44,
                }
                async with http.post(url, data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


def main() -> None:
    """serve PORT | post URL N CONCURRENCY BODY_BYTES."""
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "post":
        uvloop.install()
        rate = asyncio.run(post(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
        print(f"RATE {rate:.0f}", flush=True)
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")


if __name__ == "__main__":
    main()
