"""Rate limiters of the provider simulator, and the exact window count its stats report.

Pure: every method takes the time (a monotonic float, seconds) from the caller, so the limiter
and the statistics see the same instant and tests can drive them with made-up times.

Two shapes, because the providers describe two kinds of limit:

* WindowLimit: "N messages per second" (Meta's throughput, Twilio's MPS per sender). It is the
  token bucket whose every token comes back exactly one window after it was spent, so no window
  of that length ever holds more than N accepted sends. A classic refilling bucket of capacity N
  and rate N/s would admit up to 2N in one second (a full bucket plus a second of refill), which
  is not what "80 per second" means and not what a test can assert.
* TokenBucket: a burst allowance with a slow refill (Meta's pair rate: a burst of about 45
  messages to one user, then one every 6 s until the borrowed tokens are paid back).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class WindowLimit:
    """At most `limit` acceptances in any half-open window [t, t + window)."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        if limit < 0 or window <= 0:
            raise ValueError("limit must be >= 0 and window > 0")
        self.limit = limit
        self.window = window
        self._spent: deque[float] = deque()  # times of the acceptances still inside the window

    def allows(self, now: float) -> bool:
        """Whether a send at `now` fits (nothing is counted)."""
        # The same comparison as max_in_window, so float rounding cannot make them disagree.
        while self._spent and now - self._spent[0] >= self.window:
            self._spent.popleft()
        return len(self._spent) < self.limit

    def take(self, now: float) -> None:
        """Count a send at `now` (call after allows(now) said yes, with no await in between)."""
        self._spent.append(now)

    def try_take(self, now: float) -> bool:
        if not self.allows(now):
            return False
        self.take(now)
        return True


class TokenBucket:
    """`capacity` tokens, refilled at `refill_per_s`; a send takes one token or is refused."""

    def __init__(self, capacity: float, refill_per_s: float, now: float) -> None:
        if capacity < 1 or refill_per_s < 0:
            raise ValueError("capacity must be >= 1 and refill_per_s >= 0")
        self.capacity = capacity
        self.refill_per_s = refill_per_s
        self._tokens = capacity
        self._at = now

    def allows(self, now: float) -> bool:
        """Whether a token is there at `now` (refills, takes nothing)."""
        elapsed = max(0.0, now - self._at)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.refill_per_s)
        self._at = max(self._at, now)
        return self._tokens >= 1

    def take(self, now: float) -> None:
        """Spend a token (call after allows(now) said yes)."""
        self._tokens -= 1

    def try_take(self, now: float) -> bool:
        if not self.allows(now):
            return False
        self.take(now)
        return True


def max_in_window(times: Iterable[float], window: float = 1.0) -> int:
    """The largest number of `times` inside any half-open window [t, t + window)."""
    ordered = sorted(times)
    best = 0
    start = 0
    for end, at in enumerate(ordered):
        while at - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best
