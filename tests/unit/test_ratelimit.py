"""Token buckets: evenly paced at burst 1, bursts up to `burst`, never more than rate + burst."""

from __future__ import annotations

import random

from domain.ratelimit import SendWindow, TokenBucket, number_window


def _run(
    bucket: TokenBucket, seconds: float, start: float = 100.0, late: float = 0.0, seed: int = 1
) -> list[float]:
    """Take a token whenever one is there, as a greedy sender would; the send times. With `late`,
    each wake-up comes up to that many seconds after the token was due (a busy event loop)."""
    rng = random.Random(seed)
    now, sent = start, []
    while now < start + seconds:
        wait = bucket.wait(now)
        if wait > 0:
            now += wait + rng.uniform(0, late)
            continue
        bucket.take(now)
        sent.append(now)
    return sent


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while t - times[j] >= window:  # SendWindow's comparison: float rounding cannot split them
            j += 1
        best = max(best, i - j + 1)
    return best


def test_paced_bucket_never_exceeds_its_rate_in_any_window() -> None:
    sent = _run(TokenBucket(rate=80, burst=1), 10)
    assert 795 <= len(sent) <= 801
    assert _max_in_window(sent) <= 80


def test_burst_then_rate() -> None:
    bucket = TokenBucket(rate=1 / 6, burst=45)  # Meta's pair rate: ~45 in 6 s, then 1 per 6 s
    sent = _run(bucket, 60)
    assert len([t for t in sent if t < 100.001]) == 45  # the burst at once
    assert 45 + 9 <= len(sent) <= 45 + 11  # then one per 6 s
    assert bucket.wait(200) == 0


def test_wait_reports_the_time_to_the_next_token() -> None:
    bucket = TokenBucket(rate=2, burst=1)
    assert bucket.wait(0) == 0
    bucket.take(0)
    assert bucket.wait(0) == 0.5
    assert bucket.wait(0.25) == 0.25


def test_a_bucket_taken_below_zero_waits_longer_and_is_not_refilled() -> None:
    bucket = TokenBucket(rate=2, burst=1)
    bucket.take(0)
    bucket.take(0)  # a caller that did not wait: it owes a token
    assert bucket.wait(0) == 1.0
    assert bucket.wait(0.5) == 0.5


def test_the_window_holds_requests_that_come_in_bunches() -> None:
    # Sends start evenly paced, but leave in bunches (each waits for a group commit of up to
    # 60 ms): counted as they leave, no 1 s window holds more than the window's limit.
    rng = random.Random(7)
    window = number_window(80)
    assert window.limit == 79
    started = _run(TokenBucket(rate=80 * 0.98, burst=1), 20)
    left: list[float] = []
    bunched: list[float] = []  # when they would leave without the window
    commit_at = 100.0
    for t in started:
        while commit_at < t:
            commit_at += rng.uniform(0.005, 0.060)
        now = commit_at  # the bunch leaves when its commit returns
        bunched.append(now)
        while (wait := window.wait(now)) > 0:
            now += wait
        window.take(now)
        left.append(now)
    assert _max_in_window(bunched) > 80  # what the provider refused
    assert _max_in_window(left) <= 79
    assert len(left) == len(started)
    assert left[-1] - left[0] <= (started[-1] - started[0]) + 1.0  # it delays, it does not drop


def test_the_window_waits_for_its_oldest_to_age_out() -> None:
    window = SendWindow(limit=2, window=1.0)
    assert window.wait(0.0) == 0
    window.take(0.0)
    window.take(0.25)
    assert window.wait(0.5) == 0.5
    assert window.wait(1.0) == 0
    assert number_window(1).limit == 1
