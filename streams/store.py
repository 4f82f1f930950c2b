"""Postgres reads and channel writes used by the admin API and the webhook ingress."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import orjson


class DuplicateChannel(Exception):
    """A channel with this id exists already."""


def _encode_cursor(opened_at: datetime, conv_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([opened_at.isoformat(), conv_id])).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Parse a listing cursor; ValueError when it is not one of ours.

    Every part is checked here, so a tampered cursor is a 400 and never reaches Postgres:
    a JSON pair of an ISO time with its offset and a conversation uuid.
    """
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not (isinstance(decoded, list) and len(decoded) == 2):
            raise TypeError("not a pair")
        opened_at, conv_id = decoded
        if not (isinstance(opened_at, str) and isinstance(conv_id, str)):
            raise TypeError("not two strings")
        at = datetime.fromisoformat(opened_at)
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("time without offset")
        return at, str(uuid.UUID(conv_id))
    except Exception as exc:
        raise ValueError("cursor is not valid") from exc


def _jsonable(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif value is not None and key.endswith("id") and not isinstance(value, str | int):
            out[key] = str(value)  # uuids
        else:
            out[key] = value
    return out


class Store:
    """Queries over the authoritative state; the lifecycle agent writes through projection."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create_channel(self, channel_id: str, provider: str, config: dict[str, Any]) -> datetime:
        """Register a channel; raises DuplicateChannel if the id is taken."""
        try:
            created: datetime = await self.pool.fetchval(
                "INSERT INTO channels (id, provider, config) VALUES ($1, $2, $3) RETURNING created_at",
                channel_id,
                provider,
                config,
            )
        except asyncpg.UniqueViolationError as exc:
            what = "phone_number_id or account_sid" if "config" in str(exc.detail or "") else "id"
            raise DuplicateChannel(f"a channel with this {what} exists ({channel_id})") from exc
        return created

    async def channel(self, channel_id: str) -> tuple[str, dict[str, Any]] | None:
        """(provider, config) of a channel, or None."""
        row = await self.pool.fetchrow("SELECT provider, config FROM channels WHERE id = $1", channel_id)
        return (row["provider"], row["config"]) if row else None

    async def channel_by(self, provider: str, field: str, value: str) -> tuple[str, dict[str, Any]] | None:
        """(channel id, config) of the channel whose config[field] == value, or None."""
        assert field in {"phone_number_id", "account_sid", "verify_token"}  # never user input
        row = await self.pool.fetchrow(
            f"SELECT id, config FROM channels WHERE provider = $1 AND config->>'{field}' = $2",
            provider,
            value,
        )
        return (row["id"], row["config"]) if row else None

    async def channels(self) -> list[dict[str, Any]]:
        """Every channel, without secrets."""
        rows = await self.pool.fetch("SELECT id, provider, created_at FROM channels ORDER BY id")
        return [_jsonable(r) for r in rows]

    async def conversations(
        self,
        *,
        contact: str | None,
        channel: str | None,
        state: str | None,
        limit: int,
        cursor: tuple[datetime, str] | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of conversations, newest first, and the cursor of the next page."""
        rows = await self.pool.fetch(
            "SELECT * FROM conversations"
            " WHERE ($1::text IS NULL OR contact_id = $1)"
            " AND ($2::text IS NULL OR channel_id = $2)"
            " AND ($3::text IS NULL OR state = $3)"
            " AND ($4::timestamptz IS NULL OR (opened_at, id) < ($4, $5::uuid))"
            " ORDER BY opened_at DESC, id DESC LIMIT $6",
            contact,
            channel,
            state,
            cursor[0] if cursor else None,
            cursor[1] if cursor else None,
            limit + 1,
        )
        items = [_jsonable(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            next_cursor = _encode_cursor(last["opened_at"], str(last["id"]))
        return items, next_cursor

    async def conversation(self, conv_id: str) -> dict[str, Any] | None:
        """One conversation, or None."""
        row = await self.pool.fetchrow("SELECT * FROM conversations WHERE id = $1", conv_id)
        return _jsonable(row) if row else None

    async def messages(self, conv_id: str) -> list[dict[str, Any]]:
        """A conversation's messages in arrival order."""
        rows = await self.pool.fetch(
            "SELECT id, provider_message_id, direction, type, text, payload, status, sent_at,"
            " created_at FROM messages WHERE conversation_id = $1 ORDER BY id",
            conv_id,
        )
        return [_jsonable(r) for r in rows]

    async def events(self, conv_id: str) -> list[dict[str, Any]]:
        """A conversation's audit log in order."""
        rows = await self.pool.fetch(
            "SELECT id, event_id, kind, from_state, to_state, cause, detail, version, occurred_at"
            " FROM conversation_events WHERE conversation_id = $1 ORDER BY id",
            conv_id,
        )
        return [_jsonable(r) for r in rows]

    async def dead_letters(self, *, limit: int, before: int | None) -> list[dict[str, Any]]:
        """Dead letters, newest first."""
        rows = await self.pool.fetch(
            "SELECT * FROM dead_letters WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
            before,
            limit,
        )
        return [_jsonable(r) for r in rows]

    async def dead_letter(self, letter_id: int) -> dict[str, Any] | None:
        """One dead letter, or None."""
        row = await self.pool.fetchrow("SELECT * FROM dead_letters WHERE id = $1", letter_id)
        return _jsonable(row) if row else None

    async def mark_retried(self, letter_id: int) -> None:
        """Remember that an operator re-drove this letter."""
        await self.pool.execute("UPDATE dead_letters SET retried_at = now() WHERE id = $1", letter_id)
