"""Token buckets for the providers' limits (pure: time is a parameter).

A bucket holds up to `burst` tokens and refills at `rate` per second; a send takes one. With
burst 1 the sends are evenly paced, so no 1-second window, however placed, sees more than
`rate` of them (plus the one in hand). `wait(now)` says how long until a token is there without
taking it; `take(now)` takes one (the caller checked `wait` first).

`number_bucket` paces a business number: a bucket of burst 1 loses capacity whenever the sender
looks late (it is full exactly when a send is due, so every millisecond of lateness is time no
token accrues: 3-5% of the limit at 80/s, measured), so a number's bucket holds up to 2 tokens
and refills at a rate low enough that rate + burst stays a send below the limit: no 1-second
window sees more than the limit even when a request's trip to the provider is a little slower
than the one before it.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def number_bucket(throughput: float, margin: float) -> TokenBucket:
    """The bucket of a business number allowed `throughput` sends per second, paced at `margin`
    of it: burst 2 where rate + 2 + 1 still fits under the limit, else 1 (a slow number)."""
    rate = throughput * margin
    return TokenBucket(rate, max(1.0, min(2.0, throughput - rate - 1)))
