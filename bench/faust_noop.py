"""Baseline: Faust's stream machinery alone. A no-op agent (manual acks, same settings as the
worker) drains n pre-produced events; run as `python -m bench.faust_noop BOOTSTRAP TOPIC N`,
it prints the events/s it measured between the first and the last event."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid

import faust
import uvloop

from agents.app import broker_urls


def main() -> None:
    """Consume N events from TOPIC with a no-op agent, print the rate, exit."""
    bootstrap, topic_name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    uvloop.install()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = faust.App(
        "noop-" + uuid.uuid4().hex[:8],
        broker=broker_urls(bootstrap),
        store="memory://",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,
        stream_wait_empty=False,
        stream_buffer_maxsize=4000,
        datadir=tempfile.mkdtemp(prefix="faust-noop-"),
    )
    topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw")
    seen = 0
    started = 0.0

    @app.agent(topic)
    async def noop(stream: faust.StreamT[bytes]) -> None:
        nonlocal seen, started
        manual = stream.noack()  # type: ignore[attr-defined]
        async for event in manual.events():
            if seen == 0:
                started = time.perf_counter()
            seen += 1
            await manual.ack(event)
            if seen >= n:
                # Faust writes terminal control codes to stdout too; the marker makes it parseable.
                print(f"RATE {(n - 1) / (time.perf_counter() - started):.0f}", flush=True)
                os._exit(0)  # a measurement, not a service: no graceful shutdown to wait for

    worker = faust.Worker(app, loop=loop, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
