"""Scheduled actions: one vocabulary for everything that happens later.

An action is (owner, name) -> (due, token). The owner is the Kafka key the action belongs to
(a conversation thread `channel/contact`, or `schedule:<key>` for a user schedule): it picks the
partition, so the action fires on the owner's partition, in order with everything else the owner
does. Several actions can be pending per owner (a close deadline and a send retry on one thread).
The token names one arming: a firing whose token is not the current one is stale and never acts.

The core returns `Arm` / `Disarm` decisions; the shell stores them in Postgres in the same
transaction as the change that made them (the durable intent), then indexes them (timer wheel)
and, when due, produces the firing event with a deterministic id: firing twice is a no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

# Lifecycle action names.
CLOSE = "close"  # a conversation's deadline; token "<conversation id>:<version>"


@dataclass(frozen=True, slots=True)
class Arm:
    """Arm (or re-arm) `name` of `owner` for `due_at`; replaces any arming of the same name."""

    owner: str
    name: str
    due_at: datetime
    token: str


@dataclass(frozen=True, slots=True)
class Disarm:
    """Cancel `name` of `owner` (nothing happens if it is not armed)."""

    owner: str
    name: str


Action = Arm | Disarm


def due_ms(at: datetime) -> int:
    """A due time in whole ms, rounded up so an action never fires before it is due."""
    return math.ceil(at.timestamp() * 1000)


def last_per_action(actions: list[Action]) -> dict[tuple[str, str], Action]:
    """The decision that counts for each (owner, name): the last one, in order."""
    last: dict[tuple[str, str], Action] = {}
    for action in actions:
        key = (action.owner, action.name)
        last.pop(key, None)
        last[key] = action
    return last


def close_token(conversation_id: str, version: int) -> str:
    """The token of a conversation's close deadline at one version."""
    return f"{conversation_id}:{version}"


def split_close_token(token: str) -> tuple[str, int]:
    """Inverse of close_token."""
    conversation_id, _, version = token.rpartition(":")
    return conversation_id, int(version)
