"""What a due action becomes: the event its firing puts on its owner's partition.

The scheduler (agents/scheduler.py) and the backup sweep build firings only here, so the same
arming always produces the same event id and a repeat (timer + sweep, or after a restart) is a
ledger duplicate. Each action name has its builder; the engine knows nothing else about them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from domain.actions import CLOSE, split_close_token
from domain.schedules import SCHEDULE
from streams.records import ConversationEvent, TimerFiredRecord
from streams.schedules_plan import schedule_firing

Source = Literal["timer", "sweep"]
# owner, token, due (ms, see domain.actions.due_ms), fired_at, source -> the event
Builder = Callable[[str, str, int, datetime, Source], ConversationEvent]


def timer_event_id(conversation_id: str, version: int, due: int) -> str:
    """The identity of one close-deadline firing; the sweep uses the same one, so repeats dedupe."""
    return f"timer:{conversation_id}:{version}:{due}"


def close_firing(owner: str, token: str, due: int, fired_at: datetime, source: Source) -> TimerFiredRecord:
    """A conversation's deadline came due: TimerFired for that conversation and version."""
    channel_id, _, contact_id = owner.partition("/")
    conversation_id, version = split_close_token(token)
    due_at = datetime.fromtimestamp(due / 1000, UTC)
    return TimerFiredRecord(
        event_id=timer_event_id(conversation_id, version, due),
        channel_id=channel_id,
        contact_id=contact_id,
        conversation_id=conversation_id,
        version=version,
        due_at=due_at,
        fired_at=max(fired_at, due_at),  # never before its deadline, whoever fires it
        source=source,
    )


FIRINGS: dict[str, Builder] = {CLOSE: close_firing, SCHEDULE: schedule_firing}


def firing(
    owner: str, name: str, token: str, due: int, fired_at: datetime, source: Source
) -> ConversationEvent:
    """The event of one due action; KeyError for a name nobody registered."""
    return FIRINGS[name](owner, token, due, fired_at, source)
