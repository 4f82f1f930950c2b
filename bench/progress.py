"""Progress of a bench phase's long waits: a line on stderr every 10 s while one lasts, so a
phase that takes minutes says what it is waiting for and for how long."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tests.integration.harness import wait_until

T = TypeVar("T")


async def waiting(
    probe: Callable[[], Awaitable[T | None]], timeout: float, what: str, every: float = 10.0
) -> T:
    """wait_until(probe, timeout, what), printing the time spent every `every` seconds."""
    started = time.monotonic()

    async def tick() -> None:
        while True:
            await asyncio.sleep(every)  # the reporting period, not synchronisation
            print(
                f"    ... waiting for {what}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True
            )

    ticker = asyncio.ensure_future(tick())
    try:
        return await wait_until(probe, timeout, what)
    finally:
        ticker.cancel()
