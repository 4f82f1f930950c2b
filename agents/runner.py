"""How an agent carries out a batch without ever losing or stalling on it.

`apply_isolating` applies a batch in order; when it fails for its own reasons, it bisects to
find the failing events, applies everything else in order, and parks only the failing ones.
One poison event in a batch of n costs about 2*log2(n) transactions, not n.

`agents/batching.py` holds the consume/handle/ack loop every agent uses (`consume_batches`):
acks only after the batch is safe.

`supervise` makes a background task's death fatal: a worker whose writer died must leave the
consumer group (so its partitions move to a live worker) instead of holding them silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg
from asyncpg.exceptions._base import DataError as ClientDataError

from streams.projection import StaleVersion

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_TRANSIENT_SQLSTATE_CLASSES = {"08", "40", "53", "57"}  # connection, rollback, resources, shutdown


def is_transient(exc: BaseException) -> bool:
    """Errors that go away by themselves: retry without limit, never dead-letter."""
    if isinstance(exc, ClientDataError):
        # asyncpg's client-side "cannot encode this value" (an int out of int4 range) is an
        # InterfaceError too, but retrying it can never succeed.
        return False
    if isinstance(exc, StaleVersion | OSError | asyncio.TimeoutError | asyncpg.InterfaceError):
        return True
    # A migration changed a table under a running worker: asyncpg drops the statement or type it
    # cached, and the same batch goes through on the next try (never a reason to park it).
    if isinstance(exc, asyncpg.InvalidCachedStatementError | asyncpg.exceptions.OutdatedSchemaCacheError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


async def with_retries(call: Callable[[], Awaitable[R]], *, retries: int, what: str) -> R:
    """Await call(): transient failures are retried without limit (the partition waits for
    Postgres to come back), others `retries` times; backoff from 10 ms, doubling, up to 5 s."""
    attempt = 0
    delay = 0.01
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc):
                attempt += 1
                if attempt > retries:
                    raise
            log.warning("%s failed (%s: %s); retrying in %.2fs", what, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)  # backoff between retries, not synchronisation
            delay = min(delay * 2, 5.0)


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
