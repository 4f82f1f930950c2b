"""How an agent carries out a batch without ever losing or stalling on it.

`apply_isolating` applies a batch in order; when it fails for its own reasons, it bisects to
find the failing events, applies everything else in order, and parks only the failing ones.
One poison event in a batch of n costs about 2*log2(n) transactions, not n.

`supervise` makes a background task's death fatal: a worker whose writer died must leave the
consumer group (so its partitions move to a live worker) instead of holding them silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def apply_isolating(
    items: Sequence[T],
    apply: Callable[[Sequence[T]], Awaitable[None]],
    park: Callable[[T, BaseException], Awaitable[None]],
) -> None:
    """Apply `items` in order; park (only) the items that fail even when applied alone.

    `apply` must retry transient failures itself and raise only what retrying cannot fix.
    Halves are applied left to right, so the order of the surviving items is kept.
    """
    if not items:
        return
    try:
        await apply(items)
        return
    except Exception as exc:  # noqa: BLE001 - whatever failed, narrow it down
        if len(items) == 1:
            await park(items[0], exc)
            return
    mid = len(items) // 2
    await apply_isolating(items[:mid], apply, park)
    await apply_isolating(items[mid:], apply, park)


def supervise(task: asyncio.Task[None], name: str, on_fatal: Callable[[BaseException], None]) -> None:
    """Call on_fatal when `task` ends by an exception (cancellation is a normal stop)."""

    def done(t: asyncio.Task[None]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is None:
            exc = RuntimeError(f"{name} returned; it must run until the worker stops")
        log.critical("%s died: %s: %s", name, type(exc).__name__, exc, exc_info=exc)
        on_fatal(exc)

    task.add_done_callback(done)
