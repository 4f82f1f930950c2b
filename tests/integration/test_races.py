"""The seeds' five race conditions (race-conditions.md), reproduced deterministically.

Each test puts an exact sequence of events on one thread's partition, with explicit event
times, and checks the outcome in Postgres. Deadlines are the long defaults, so no real timer
interferes: the timer firings here are the events the timer table would produce.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from domain.lifecycle import CloseReason
from tests.integration.harness import Deployment, GenericChannel, wait_until
from tests.integration.lifecycle_helpers import Thread, now


async def _opened(t: Thread, db: asyncpg.Connection, at: datetime) -> dict[str, Any]:
    await t.produce(t.message("preciso de ajuda", at, "first"))
    [conv] = await t.wait(db, "the conversation", lambda c: len(c) == 1)
    return conv


def _deadline(conv: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(conv["deadline_at"])


async def _closes(t: Thread, db: asyncpg.Connection, conv_id: str) -> list[str]:
    return [e["detail"] for e in await t.events(db, conv_id) if e["kind"] == "closed"]


async def test_a_user_message_just_before_expiry_keeps_the_conversation_open(
    deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    conv = await _opened(t, db, now())
    deadline = _deadline(conv)
    # The worker's expiry (for version 1) lands after the user's "Obrigado!" on the partition.
    await t.produce(t.message("Obrigado!", deadline - timedelta(seconds=1), "thanks"), t.timer(conv))
    await t.wait(db, "the stale timer to be applied", lambda c: c[0]["version"] >= 2)
    sentinel = t.message("Posso fazer outra pergunta?", deadline + timedelta(seconds=2), "question")
    await t.produce(sentinel)
    await t.wait(db, "the question", lambda c: c[0]["version"] >= 3)
    [final] = await t.conversations(db)
    assert final["state"] == "idle" and final["close_reason"] is None  # not closed under the user
    assert await t.messages(db) == ["first", "thanks", "question"]  # nothing lost
    kinds = [e["kind"] for e in await t.events(db, conv["id"])]
    assert "stale_timer" in kinds and "closed" not in kinds


async def test_a_user_message_just_after_expiry_opens_a_linked_conversation(
    deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    conv = await _opened(t, db, now())
    deadline = _deadline(conv)
    await t.produce(t.timer(conv), t.message("Obrigado!", deadline + timedelta(milliseconds=1), "late"))
    first, second = await t.wait(db, "a second conversation", lambda c: len(c) == 2)
    assert first["close_reason"] == "expired" and first["closed_at"] >= deadline
    assert second["previous_conversation_id"] == first["id"] and second["state"] == "idle"
    assert await t.messages(db) == ["first", "late"]


@pytest.mark.parametrize("order", ["timer_first", "close_first"])
async def test_agent_close_at_the_moment_of_expiry_is_agent_closed(
    deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection, order: str
) -> None:
    t = Thread(deployment, channel.id)
    conv = await _opened(t, db, now())
    deadline = _deadline(conv)
    close = t.close(conv, deadline + timedelta(seconds=1))
    timer = t.timer(conv)
    await t.produce(*((timer, close) if order == "timer_first" else (close, timer)))
    await t.wait(
        db,
        "both events",
        lambda c: c[0]["state"] == "closed" and c[0]["version"] >= 2 + (order == "timer_first"),
    )
    [final] = await t.conversations(db)
    assert final["close_reason"] == "agent_closed"
    kinds = [e["kind"] for e in await t.events(db, conv["id"])]
    assert kinds.count("closed") == 1
    assert ("close_upgraded" in kinds) == (order == "timer_first")
    assert ("stale_timer" in kinds) == (order == "close_first")


async def test_agent_close_after_the_grace_window_is_rejected_and_recorded(
    deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    conv = await _opened(t, db, now())
    deadline = _deadline(conv)
    late = t.close(conv, deadline + timedelta(seconds=31))  # default grace is 30 s
    await t.produce(t.timer(conv), late)
    await t.wait(db, "the rejection", lambda c: c[0]["state"] == "closed")

    async def rejected() -> bool:
        return any(e["kind"] == "close_rejected" for e in await t.events(db, conv["id"]))

    await wait_until(rejected, 30, "close_rejected in the log")
    [final] = await t.conversations(db)
    assert final["close_reason"] == "expired"


async def test_closure_detected_before_expiry_closes_as_user_closed(
    deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    t0 = now()
    conv = await _opened(t, db, t0)
    old_timer = t.timer(conv)  # the expiry the worker had already computed for version 1
    await t.produce(t.message("Ok, pode fechar então", t0 + timedelta(seconds=1), "bye"), old_timer)
    [pending] = await t.wait(
        db, "waiting_close", lambda c: c[0]["state"] == "waiting_close" and c[0]["version"] >= 2
    )

    async def stale_applied() -> bool:
        return any(e["kind"] == "stale_timer" for e in await t.events(db, conv["id"]))

    await wait_until(stale_applied, 30, "the old timer to be ignored")
    assert (await t.conversations(db))[0]["state"] == "waiting_close"
    await t.produce(t.timer(pending))
    [final] = await t.wait(db, "the close", lambda c: c[0]["state"] == "closed")
    assert final["close_reason"] == CloseReason.USER_CLOSED  # never expired
    [closed] = await _closes(t, db, conv["id"])
    assert closed.startswith("user_closed")


async def test_two_messages_within_100_ms_are_both_stored_and_keep_the_agent(
    deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    t0 = now()
    conv = await _opened(t, db, t0)
    await t.produce(t.accept(conv, "ana", t0 + timedelta(seconds=1)))
    await t.wait(db, "processing", lambda c: c[0]["state"] == "processing")
    at = t0 + timedelta(seconds=2)
    await t.produce(t.message("um", at, "one"), t.message("dois", at + timedelta(milliseconds=50), "two"))
    [final] = await t.wait(db, "both messages", lambda c: c[0]["version"] >= 4)
    assert final["assigned_agent"] == "ana" and final["state"] == "processing"
    assert await t.messages(db) == ["first", "one", "two"]
    assert len(await t.conversations(db)) == 1


async def test_duplicate_sweeps_close_once(
    deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    t = Thread(deployment, channel.id)
    conv = await _opened(t, db, now())
    # Two sweeps and the timer itself all fire the same deadline.
    await t.produce(t.timer(conv, source="sweep"), t.timer(conv, source="sweep"), t.timer(conv))
    await t.produce(t.message("depois", _deadline(conv) + timedelta(seconds=5), "after"))
    await t.wait(db, "the message after", lambda c: len(c) == 2)
    first, _ = await t.conversations(db)
    assert first["close_reason"] == "expired"
    assert len(await _closes(t, db, conv["id"])) == 1
    ledger = await db.fetchval(
        "SELECT count(*) FROM processed_events WHERE event_id LIKE $1", f"timer:{conv['id']}:%"
    )
    assert ledger == 1
