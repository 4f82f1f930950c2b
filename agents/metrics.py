"""The worker's /metrics (Prometheus text format) and /healthz, on its own small port."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

Gauges = Callable[[], dict[str, float]]
# None when healthy, else why not (e.g. the lifecycle writer died and the worker is stopping).
Health = Callable[[], str | None]


def render(values: dict[str, float]) -> str:
    """Prometheus exposition text for flat name -> value pairs (ints exact: a timestamp in ms
    would lose its last digits to %g)."""
    return "".join(
        f"{name} {value if isinstance(value, int) else format(value, 'g')}\n"
        for name, value in sorted(values.items())
    )


async def serve(host: str, port: int, gauges: Gauges, health: Health) -> web.AppRunner:
    """Start the metrics server; the caller keeps the runner to stop it."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=render(gauges()), content_type="text/plain")

    async def healthz(request: web.Request) -> web.Response:
        problem = health()
        if problem is not None:
            return web.json_response({"status": "failing", "reason": problem}, status=503)
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
