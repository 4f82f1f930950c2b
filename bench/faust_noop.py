"""Baseline: Faust's stream machinery alone. A no-op agent (manual acks, same settings as the
worker) drains n pre-produced events; run as `python -m bench.faust_noop BOOTSTRAP TOPIC N [PATH]`,
it prints the events/s it measured between the first and the last event.

PATH is `events` (default: Faust's per-event path, a stream of Events acked one by one) or
`batches` (agents/batching.py: the records of each fetch handed to the agent as one list of
Messages, acked after the no-op handle returned, as the worker's agents consume)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import faust
import uvloop

from agents import batching
from agents.app import broker_urls

BATCH_LIMIT = 1000  # the worker's default batch size (PARLEY_WORKER_BATCH_SIZE)


def main() -> None:
    """Consume N events from TOPIC with a no-op agent, print the rate, exit."""
    bootstrap, topic_name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    path = sys.argv[4] if len(sys.argv) > 4 else "events"
    uvloop.install()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    datadir = tempfile.mkdtemp(prefix="faust-noop-")
    app = faust.App(
        "noop-" + uuid.uuid4().hex[:8],
        broker=broker_urls(bootstrap),
        store="memory://",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,
        stream_wait_empty=False,
        stream_buffer_maxsize=4000,
        datadir=datadir,
    )
    topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw")
    seen = 0
    first = 0
    started = 0.0

    def done() -> None:
        # Faust writes terminal control codes to stdout too; the marker makes it parseable.
        print(f"RATE {(n - first) / (time.perf_counter() - started):.0f}", flush=True)
        shutil.rmtree(datadir, ignore_errors=True)  # os._exit skips every clean-up
        os._exit(0)  # a measurement, not a service: no graceful shutdown to wait for

    if path == "batches":
        intake = batching.register(app, topic, BATCH_LIMIT)

        async def handle(batch: list[Any]) -> None:
            nonlocal seen, first, started
            if seen == 0:
                started, first = time.perf_counter(), len(batch)
            seen += len(batch)
            if seen >= n:
                done()

        @app.agent(topic)
        async def noop_batches(stream: faust.StreamT[bytes]) -> None:
            await batching.consume_batches(
                intake, linger=0, handle=handle, name="noop", on_fatal=lambda exc: os._exit(1)
            )

    else:

        @app.agent(topic)
        async def noop(stream: faust.StreamT[bytes]) -> None:
            nonlocal seen, first, started
            manual = stream.noack()  # type: ignore[attr-defined]
            async for event in manual.events():
                if seen == 0:
                    started, first = time.perf_counter(), 1
                seen += 1
                await manual.ack(event)
                if seen >= n:
                    done()

    worker = faust.Worker(app, loop=loop, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
