"""Token buckets for the providers' limits (pure: time is a parameter).

A bucket holds up to `burst` tokens and refills at `rate` per second; a send takes one. With
burst 1 the sends are evenly paced, so no 1-second window, however placed, sees more than
`rate` of them (plus the one in hand). `wait(now)` says how long until a token is there without
taking it; `take(now)` takes one (the caller checked `wait` first).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # most tokens held at once
    tokens: float = -1.0  # -1: full at the first look
    at: float = 0.0  # when `tokens` was last computed (seconds)

    def _refill(self, now: float) -> None:
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
            return
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def wait(self, now: float) -> float:
        """Seconds until one token is available (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        """Take one token (may go below zero if the caller did not wait: it then waits longer)."""
        self._refill(now)
        self.tokens -= 1
