"""The scheduler's time horizon: which pending actions a worker holds in memory.

A worker keeps in memory (its actions table and timer wheel) only the actions due before
`loaded_until`, about `span` ahead of now; the rest live only in Postgres' scheduled_actions,
indexed by (partition, due_at), and are read in by time range as the horizon moves on (Kafka's
purgatory and Temporal/Cadence's timer queues load timers the same way). Memory is then bounded
by the actions due within one span, not by everything pending.

Invariant, for the partitions the worker owns once a load has completed: every action due
before `loaded_until` is in memory. It holds because

- a load reads `[loaded_until, target)` (after an assignment: `[-inf, target)`) and only then
  sets `loaded_until = target`;
- an arming decided while nothing loads is kept in memory iff it is due before `loaded_until`
  (later ones are in Postgres already, and the next load's window starts at `loaded_until`);
- while a load runs, `target` is already the bound (`begin` sets it before the query starts):
  an arming committed after the query's snapshot and due inside the window is kept in memory,
  as the read cannot see it.

Membership compares datetimes (`due_at < at(bound)`), exactly as the SQL windows do, so an
action on a window's edge belongs to exactly one side. The shell (agents/scheduler.py) does the
IO; this module is the arithmetic, without IO.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def at(ms: int) -> datetime:
    """The instant `ms` milliseconds after the epoch, exactly (no float on the way)."""
    return EPOCH + timedelta(milliseconds=ms)


class Horizon:
    """How far ahead the worker's memory holds every pending action, and the load in progress."""

    __slots__ = ("loaded_until", "loading_to", "span_ms")

    def __init__(self, span_ms: int) -> None:
        """A horizon of `span_ms` ahead of now; nothing is loaded yet."""
        if span_ms < 2:
            raise ValueError("the horizon must span at least 2 ms")
        self.span_ms = span_ms
        self.loaded_until = 0  # every owned action due before this is in memory (0: none loaded)
        self.loading_to: int | None = None  # the target of the load in progress, if any

    @property
    def loaded(self) -> bool:
        """Whether a load has completed (before that, memory holds nothing for sure)."""
        return self.loaded_until > 0

    def bound(self) -> int:
        """Ms before which an arming goes to memory: the loaded horizon, or the running load's
        target (set before its query started, so what the query may miss is kept)."""
        if self.loading_to is None:
            return self.loaded_until
        return max(self.loaded_until, self.loading_to)

    def keeps(self, due_at: datetime) -> bool:
        """Whether an action due at `due_at` belongs in memory now."""
        return due_at < at(self.bound())

    def begin(self, now_ms: int) -> tuple[int, int]:
        """Start a load at `now_ms`: returns the window `[lo, hi)` to read. `hi` becomes the
        bound at once; it never moves back (a clock stepping back does not shrink the horizon)."""
        if self.loading_to is not None:
            raise RuntimeError("a load is already running")
        hi = max(now_ms + self.span_ms, self.loaded_until)
        self.loading_to = hi
        return self.loaded_until, hi

    def done(self) -> None:
        """The load read its whole window: memory holds everything due before its target."""
        if self.loading_to is None:
            raise RuntimeError("no load is running")
        self.loaded_until = max(self.loaded_until, self.loading_to)
        self.loading_to = None

    def failed(self) -> None:
        """The load failed: the horizon stays where it was (armings it kept stay, and are exact)."""
        self.loading_to = None

    def next_load_ms(self) -> int | None:
        """When to advance: once only half a span is left ahead (None until a load completed).
        So an action is in memory at least span/2 before it is due, even if a load is slow."""
        if not self.loaded:
            return None
        return self.loaded_until - self.span_ms // 2
