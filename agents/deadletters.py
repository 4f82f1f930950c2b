"""Projects the dead-letter topic into Postgres so operators can list and re-drive letters.

Acks are manual, as in the lifecycle agent: a letter is acked only once its row is written, so
a shutdown or crash mid-retry leaves it to be projected again (the insert is idempotent on the
letter's topic position). A batch that fails for its own reasons (not a transient Postgres
problem) is retried letter by letter; a letter that still cannot be written gets a placeholder
row carrying the raw letter and the error, so the projection moves on and the operator sees it
(the letter itself stays in the topic, kept forever).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import faust
from pydantic import ValidationError

from agents.runner import with_retries
from streams.records import DeadLetter

log = logging.getLogger(__name__)

_INSERT = """
INSERT INTO dead_letters (dlq_partition, dlq_offset, source_topic, source_partition, source_offset,
                          key, value, error, attempts, failed_at, value_bytes, truncated)
SELECT * FROM unnest($1::int[], $2::bigint[], $3::text[], $4::int[], $5::bigint[], $6::text[],
                     $7::text[], $8::text[], $9::int[], $10::timestamptz[], $11::bigint[], $12::bool[])
ON CONFLICT (dlq_partition, dlq_offset) DO NOTHING
"""
_WIDTH = 12


def _text(value: str | None) -> str | None:
    # Postgres text cannot hold NUL; keep the byte visible instead of failing the row forever.
    return None if value is None else value.replace("\x00", "\\x00")


def _textual(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_text(v) if isinstance(v, str) else v for v in row)


def _row(event: Any) -> tuple[Any, ...]:
    return _textual(_raw_row(event))


def _raw_row(event: Any) -> tuple[Any, ...]:
    msg = event.message
    try:
        letter = DeadLetter.model_validate_json(msg.value)
    except ValidationError as exc:
        # Not written by Parley (or corrupted): keep it visible rather than drop it.
        return _raw_letter_row(msg, f"unreadable letter: {exc}", None, msg.timestamp and _ts(msg.timestamp))
    return (
        msg.partition,
        msg.offset,
        letter.source_topic,
        letter.partition,
        letter.offset,
        letter.key,
        letter.value,
        letter.error,
        letter.attempts,
        letter.failed_at,
        letter.value_bytes,
        letter.truncated,
    )


def _ts(ms: float) -> Any:
    return datetime.fromtimestamp(ms, UTC)


def _raw_letter_row(msg: Any, error: str, key: str | None, failed_at: Any) -> tuple[Any, ...]:
    """A row for a letter kept as its raw bytes (source unknown), with why."""
    raw = bytes(msg.value or b"").decode(errors="replace")
    return (
        msg.partition,
        msg.offset,
        "unknown",
        -1,
        -1,
        key,
        raw,
        error,
        0,
        failed_at,
        len(msg.value or b""),
        False,
    )


def _placeholder(event: Any, exc: BaseException) -> tuple[Any, ...]:
    """A row that always fits: the raw letter and why its own row could not be written."""
    msg = event.message
    key = msg.key.decode(errors="replace") if msg.key else None
    error = f"letter could not be projected ({type(exc).__name__}: {exc}); value is the raw letter"
    return _textual(_raw_letter_row(msg, error, key, datetime.now(UTC)))


def register(
    app: faust.App, topic: faust.TopicT, pool: Callable[[], Awaitable[asyncpg.Pool]], retries: int = 3
) -> None:
    """Attach the dead-letter projection agent."""

    async def project(stream: faust.StreamT[bytes]) -> None:
        manual: Any = stream.noack()  # type: ignore[attr-defined]  # on faust.Stream, not StreamT
        async for batch in manual.noack_take(500, within=0.2):  # events, never acked by Faust
            await _write(batch, pool, retries)
            for event in batch:
                await manual.ack(event)  # only now: the letter's row is in Postgres

    app.agent(topic, name="dead_letters")(project)


async def _insert(pool: Callable[[], Awaitable[asyncpg.Pool]], rows: Sequence[tuple[Any, ...]]) -> None:
    columns = [[row[i] for row in rows] for i in range(_WIDTH)]
    await (await pool()).execute(_INSERT, *columns)


async def _attempt(
    pool: Callable[[], Awaitable[asyncpg.Pool]], rows: Sequence[tuple[Any, ...]], retries: int
) -> BaseException | None:
    """Insert rows with the runner's retries (transient failures without limit, others `retries`
    times); returns the last non-transient error, or None once written."""
    try:
        what = f"dead letters: projecting {len(rows)}"  # operators grep for this
        await with_retries(lambda: _insert(pool, rows), retries=retries, what=what)
    except Exception as exc:  # noqa: BLE001 - the caller decides: split, or a placeholder row
        return exc
    return None


async def _write(batch: Sequence[Any], pool: Callable[[], Awaitable[asyncpg.Pool]], retries: int) -> None:
    rows: list[tuple[Any, ...]] = []
    for event in batch:
        try:
            rows.append(_row(event))
        except Exception as exc:  # noqa: BLE001 - an unreadable letter still gets its row
            rows.append(_placeholder(event, exc))
    if await _attempt(pool, rows, retries) is None:
        return
    for event, row in zip(batch, rows, strict=True):  # find the letter(s) that cannot be written
        error = await _attempt(pool, [row], retries)
        if error is None:
            continue
        log.error(
            "dead letters: letter %d@%d cannot be projected (%s); storing a placeholder row",
            event.message.partition,
            event.message.offset,
            error,
        )
        # If even this fails, Postgres itself is the problem (table gone, permissions): keep
        # trying, never ack an unwritten letter.
        while await _attempt(pool, [_placeholder(event, error)], 1_000_000) is not None:
            pass
