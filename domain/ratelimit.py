"""Token buckets for the providers' limits (pure: time is a parameter).

A bucket holds up to `burst` tokens and refills at `rate` per second; a send takes one. With
burst 1 the sends are evenly paced, so no 1-second window, however placed, sees more than
`rate` of them (plus the one in hand). `wait(now)` says how long until a token is there without
taking it; `take(now)` takes one (the caller checked `wait` first).

A business number's bucket has burst 1 at PARLEY_SEND_RATE_MARGIN (0.98) of its throughput.
(A bucket of 2 at 0.96, meant to absorb the sender waking late, achieved less at the provider:
0.903x of 80/s in two runs against 0.947x; what loses the few percent is not found yet.)

The bucket paces when sends *start*; between that and the request leaving, a send waits for its
`sending` mark's group commit, and under load a commit gathers sends that started over tens of
milliseconds and lets them go together (measured: the provider refused 16 of 2,400 at 80/s on a
loaded box). So a `SendWindow` also counts the requests as they leave: at most `limit` in any
1 s window, one below the number's throughput, a send of room for the trip to the provider.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # most tokens held at once
    tokens: float | None = None  # None: full at the first look
    at: float = 0.0  # when `tokens` was last computed (seconds)

    def _refill(self, now: float) -> float:
        # (None, not a negative count, marks the first look: a bucket taken below zero must wait
        # longer, not be refilled.)
        if self.tokens is None:
            self.tokens, self.at = self.burst, now
        elif now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        return self.tokens

    def wait(self, now: float) -> float:
        """Seconds until one token is available (0: now)."""
        tokens = self._refill(now)
        # Within a nanosecond's worth of a token is a token: a wait so small that adding it to
        # `now` changes nothing would have its caller look again forever.
        return 0.0 if tokens >= 1 - 1e-9 else (1 - tokens) / self.rate

    def take(self, now: float) -> None:
        """Take one token (may go below zero if the caller did not wait: it then waits longer)."""
        self.tokens = self._refill(now) - 1


@dataclass
class SendWindow:
    """At most `limit` requests leave in any window of `window` seconds (times as parameters)."""

    limit: int
    window: float = 1.0
    left: deque[float] = field(default_factory=deque)  # when the requests still inside it left

    def wait(self, now: float) -> float:
        """Seconds until one more may leave (0: now)."""
        while self.left and now - self.left[0] >= self.window:
            self.left.popleft()
        return 0.0 if len(self.left) < self.limit else self.left[0] + self.window - now

    def take(self, now: float) -> None:
        """A request leaves now (after wait(now) said 0, with no await in between)."""
        self.left.append(now)


def number_window(throughput: float) -> SendWindow:
    """A number's window: one request below its throughput per second (at least one)."""
    return SendWindow(max(1, math.ceil(throughput) - 1))
