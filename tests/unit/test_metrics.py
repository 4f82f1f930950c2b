"""The worker's /healthz says when the worker is failing; /metrics renders gauges, the lag per
partition and the latency histograms."""

from __future__ import annotations

import aiohttp

from agents.metrics import render, serve
from parley.localstack import free_port


async def test_healthz_is_503_with_the_reason_while_the_worker_is_failing() -> None:
    problem: list[str] = []
    port = free_port()
    runner = await serve(
        "127.0.0.1",
        port,
        lambda: {"parley_x": 1.0},
        lambda: problem[0] if problem else None,
        lambda: {("t.conversation-events", 3): 7},
    )
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert (r.status, await r.json()) == (200, {"status": "ok"})
            problem.append("lifecycle writer died: RuntimeError")
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 503
                assert await r.json() == {
                    "status": "failing",
                    "reason": "lifecycle writer died: RuntimeError",
                }
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            assert text.startswith("parley_x 1\n")
            assert 'parley_consumer_lag{partition="3",topic="t.conversation-events"} 7.0\n' in text
            assert "# TYPE parley_worker_batch_seconds histogram" in text
    finally:
        await runner.cleanup()


def test_render_sorts_names() -> None:
    assert render({"b": 2, "a": 0.5}) == "a 0.5\nb 2\n"


def test_render_keeps_every_digit_of_an_int() -> None:
    assert render({"loaded_until_ms": 1_764_636_044_693}) == "loaded_until_ms 1764636044693\n"


def test_render_keeps_every_digit_of_seconds_with_their_ms() -> None:
    assert render({"until_seconds": 1_764_636_044.693}) == "until_seconds 1764636044.693\n"
    assert render({"x": 1.0, "y": 0.25}) == "x 1\ny 0.25\n"
