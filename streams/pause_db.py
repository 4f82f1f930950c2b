"""Paused parts of the pipeline (migration 0014): the emergency switch every worker obeys."""

from __future__ import annotations

from datetime import datetime

import asyncpg

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
PARTS = ("lifecycle", "sender", "webhooks")
CHANNEL = "parley_paused"  # NOTIFY on every change (a statement trigger)


def parts_of(what: str) -> tuple[str, ...]:
    """The parts `what` names: one of PARTS, or "all"; ValueError otherwise."""
    if what == "all":
        return PARTS
    if what in PARTS:
        return (what,)
    raise ValueError(f"what must be one of {', '.join(PARTS)} or all")


async def paused(conn: Conn) -> dict[str, datetime]:
    """part -> since when it is paused."""
    rows = await conn.fetch("SELECT part, paused_at FROM paused_parts ORDER BY part")
    return {r["part"]: r["paused_at"] for r in rows}


async def pause(conn: Conn, parts: tuple[str, ...], reason: str) -> None:
    """Pause these parts (a part already paused keeps its time and reason)."""
    await conn.execute(
        "INSERT INTO paused_parts (part, reason) SELECT unnest($1::text[]), $2 ON CONFLICT (part) DO NOTHING",
        list(parts),
        reason,
    )


async def resume(conn: Conn, parts: tuple[str, ...]) -> None:
    """Resume these parts."""
    await conn.execute("DELETE FROM paused_parts WHERE part = ANY($1::text[])", list(parts))
