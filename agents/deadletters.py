"""Projects the dead-letter topic into Postgres so operators can list and re-drive letters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import faust
from pydantic import ValidationError

from agents.lifecycle import is_transient
from streams.records import DeadLetter

log = logging.getLogger(__name__)

_INSERT = """
INSERT INTO dead_letters (dlq_partition, dlq_offset, source_topic, source_partition, source_offset,
                          key, value, error, attempts, failed_at)
SELECT * FROM unnest($1::int[], $2::bigint[], $3::text[], $4::int[], $5::bigint[], $6::text[],
                     $7::text[], $8::text[], $9::int[], $10::timestamptz[])
ON CONFLICT (dlq_partition, dlq_offset) DO NOTHING
"""


def _text(value: str | None) -> str | None:
    # Postgres text cannot hold NUL; keep the byte visible instead of failing the row forever.
    return None if value is None else value.replace("\x00", "\\x00")


def _row(event: Any) -> tuple[Any, ...]:
    return tuple(_text(v) if isinstance(v, str) else v for v in _raw_row(event))


def _raw_row(event: Any) -> tuple[Any, ...]:
    msg = event.message
    try:
        letter = DeadLetter.model_validate_json(msg.value)
    except ValidationError as exc:
        # Not written by Parley (or corrupted): keep it visible rather than drop it.
        raw = bytes(msg.value or b"").decode(errors="replace")
        return (
            msg.partition,
            msg.offset,
            "unknown",
            -1,
            -1,
            None,
            raw,
            f"unreadable letter: {exc}",
            0,
            msg.timestamp and _ts(msg.timestamp),
        )
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
    )


def _ts(ms: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms, UTC)


def register(app: faust.App, topic: faust.TopicT, pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
    """Attach the dead-letter projection agent."""

    async def project(stream: faust.StreamT[bytes]) -> None:
        take = stream.take_events  # type: ignore[attr-defined]  # on faust.Stream, not StreamT
        async for batch in take(500, within=0.2):
            await _write(batch, pool)

    app.agent(topic, name="dead_letters")(project)


async def _write(batch: Sequence[Any], pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
    rows = [_row(event) for event in batch]
    columns = [[row[i] for row in rows] for i in range(10)]
    delay = 0.1
    while True:  # the letters are safe in Kafka; keep trying until Postgres takes them
        try:
            await (await pool()).execute(_INSERT, *columns)
            return
        except Exception as exc:  # noqa: BLE001 - any failure: retry, never ack unwritten letters
            level = logging.WARNING if is_transient(exc) else logging.ERROR
            log.log(level, "dead letters: projecting %d failed (%s); retrying", len(rows), exc)
            await asyncio.sleep(delay)  # backoff between retries
            delay = min(delay * 2, 10.0)
