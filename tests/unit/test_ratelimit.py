"""Token buckets: evenly paced at burst 1, bursts up to `burst`, never more than rate + burst."""

from __future__ import annotations

from domain.ratelimit import TokenBucket


def _run(bucket: TokenBucket, seconds: float, start: float = 100.0) -> list[float]:
    """Take a token whenever one is there, as a greedy sender would; the send times."""
    now, sent = start, []
    while now < start + seconds:
        wait = bucket.wait(now)
        if wait > 0:
            now += wait
            continue
        bucket.take(now)
        sent.append(now)
    return sent


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
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
