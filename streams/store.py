"""Postgres reads and channel writes used by the admin API and the webhook ingress."""

from __future__ import annotations

import base64
import hmac
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from streams.channel_secrets import Channel, Sealer, SecretsKeyError, from_json, split, to_json

_CHANNEL = "id, provider, config, sealed, created_at"


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


def match_secret(channels: list[Channel], field: str, value: str, now: datetime) -> Channel | None:
    """The channel one of whose active `field` secrets equals value (constant-time compares)."""
    found = None
    for ch in channels:
        for secret in ch.secrets.get(field, ()):
            if secret.active(now) and hmac.compare_digest(secret.value.encode(), value.encode()):
                found = ch
    return found


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

    def __init__(self, pool: asyncpg.Pool, sealer: Sealer | None = None) -> None:
        self.pool = pool
        self.sealer = sealer

    def require_sealer(self) -> Sealer:
        """The sealer of stored secrets (channels, webhook endpoints); SecretsKeyError without one."""
        if self.sealer is None:
            raise SecretsKeyError("channel secrets need PARLEY_SECRETS_KEY")
        return self.sealer

    def _channel(self, row: asyncpg.Record) -> Channel:
        public, secrets = split(row["provider"], row["config"])  # rows from before sealing
        if row["sealed"] is not None:
            secrets = from_json(self.require_sealer().open(row["sealed"]))
        return Channel(row["id"], row["provider"], row["created_at"], public, secrets)

    def _row(self, channel: Channel) -> tuple[dict[str, Any], str]:
        return channel.public, self.require_sealer().seal(to_json(channel.secrets))

    async def create_channel(self, channel_id: str, provider: str, config: dict[str, Any]) -> datetime:
        """Register a channel, secrets sealed; raises DuplicateChannel if the id is taken."""
        public, secrets = split(provider, config)
        sealed = self.require_sealer().seal(to_json(secrets))
        try:
            created: datetime = await self.pool.fetchval(
                "INSERT INTO channels (id, provider, config, sealed) VALUES ($1, $2, $3, $4)"
                " RETURNING created_at",
                channel_id,
                provider,
                public,
                sealed,
            )
        except asyncpg.UniqueViolationError as exc:
            what = "phone_number_id or account_sid" if "config" in str(exc.detail or "") else "id"
            raise DuplicateChannel(f"a channel with this {what} exists ({channel_id})") from exc
        return created

    async def channel_record(self, channel_id: str) -> Channel | None:
        """A channel with its secrets opened, or None."""
        row = await self.pool.fetchrow(f"SELECT {_CHANNEL} FROM channels WHERE id = $1", channel_id)
        return self._channel(row) if row else None

    async def channel_record_by(self, provider: str, field: str, value: str) -> Channel | None:
        """The channel whose clear config[field] == value (phone_number_id, account_sid), or None."""
        assert field in {"phone_number_id", "account_sid"}  # never user input
        row = await self.pool.fetchrow(
            f"SELECT {_CHANNEL} FROM channels WHERE provider = $1 AND config->>'{field}' = $2",
            provider,
            value,
        )
        return self._channel(row) if row else None

    async def provider_channels(self, provider: str) -> list[Channel]:
        """Every channel of a provider (WhatsApp's verify tokens are matched over them)."""
        rows = await self.pool.fetch(f"SELECT {_CHANNEL} FROM channels WHERE provider = $1", provider)
        return [self._channel(r) for r in rows]

    async def channel_records(self) -> tuple[list[Channel], dict[str, SecretsKeyError]]:
        """Every channel with its secrets, in one query; and those whose secrets do not open with
        PARLEY_SECRETS_KEY (id -> why), so one such channel does not hide the others."""
        found: list[Channel] = []
        unopened: dict[str, SecretsKeyError] = {}
        for row in await self.pool.fetch(f"SELECT {_CHANNEL} FROM channels"):
            try:
                found.append(self._channel(row))
            except SecretsKeyError as exc:
                unopened[row["id"]] = exc
        return found, unopened

    async def channel(self, channel_id: str) -> tuple[str, dict[str, Any]] | None:
        """(provider, config) of a channel, or None."""
        found = await self.channel_record(channel_id)
        return (found.provider, found.config(datetime.now(UTC))) if found else None

    async def channel_by(self, provider: str, field: str, value: str) -> tuple[str, dict[str, Any]] | None:
        """(channel id, config) of the channel whose config[field] == value, or None.

        verify_token is sealed: it is compared (constant time) over the provider's channels.
        """
        now = datetime.now(UTC)
        if field == "verify_token":
            found = match_secret(await self.provider_channels(provider), field, value, now)
        else:
            found = await self.channel_record_by(provider, field, value)
        return (found.id, found.config(now)) if found else None

    async def channels(self) -> list[dict[str, Any]]:
        """Every channel, without secrets."""
        rows = await self.pool.fetch("SELECT id, provider, created_at FROM channels ORDER BY id")
        return [_jsonable(r) for r in rows]

    async def update_channel(self, channel_id: str, change: Callable[[Channel], Channel]) -> Channel | None:
        """Apply change to a channel under a row lock and store it re-sealed; None if unknown."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_CHANNEL} FROM channels WHERE id = $1 FOR UPDATE", channel_id)
            if row is None:
                return None
            changed = change(self._channel(row))
            public, sealed = self._row(changed)
            await conn.execute(
                "UPDATE channels SET config = $2, sealed = $3, updated_at = now() WHERE id = $1",
                channel_id,
                public,
                sealed,
            )
        return changed

    async def delete_channel(self, channel_id: str) -> bool:
        """Remove a channel; False if there was none. Its conversations stay."""
        deleted = await self.pool.fetchval("DELETE FROM channels WHERE id = $1 RETURNING id", channel_id)
        return deleted is not None

    async def reseal_channels(self) -> tuple[int, int]:
        """Seal rows still in clear and re-encrypt every sealed row under the first key, in one
        transaction; returns (sealed from clear, re-encrypted)."""
        sealer = self.require_sealer()
        from_clear = resealed = 0
        async with self.pool.acquire() as conn, conn.transaction():
            for row in await conn.fetch(f"SELECT {_CHANNEL} FROM channels ORDER BY id FOR UPDATE"):
                if row["sealed"] is None:
                    public, sealed = self._row(self._channel(row))
                    from_clear += 1
                else:
                    public, sealed = row["config"], sealer.reseal(row["sealed"])
                    resealed += 1
                await conn.execute(
                    "UPDATE channels SET config = $2, sealed = $3 WHERE id = $1", row["id"], public, sealed
                )
        return from_clear, resealed

    async def conversations(
        self,
        *,
        contact: str | None,
        channel: str | None,
        state: str | None,
        limit: int,
        cursor: tuple[datetime, str] | None,
        reason: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of conversations, newest first, and the cursor of the next page."""
        rows = await self.pool.fetch(
            "SELECT * FROM conversations"
            " WHERE ($1::text IS NULL OR contact_id = $1)"
            " AND ($2::text IS NULL OR channel_id = $2)"
            " AND ($3::text IS NULL OR state = $3)"
            " AND ($4::timestamptz IS NULL OR (opened_at, id) < ($4, $5::uuid))"
            " AND ($7::text IS NULL OR close_reason = $7)"
            " ORDER BY opened_at DESC, id DESC LIMIT $6",
            contact,
            channel,
            state,
            cursor[0] if cursor else None,
            cursor[1] if cursor else None,
            limit + 1,
            reason,
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

    async def thread_conversation(self, channel_id: str, contact_id: str) -> dict[str, Any] | None:
        """A thread's latest conversation (the open one, when there is one), or None."""
        row = await self.pool.fetchrow(
            "SELECT * FROM conversations WHERE channel_id = $1 AND contact_id = $2"
            " ORDER BY thread_seq DESC LIMIT 1",
            channel_id,
            contact_id,
        )
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
