"""api/overview.py's pure parts: events/s from two lag samples, and the capped counts' SQL."""

from __future__ import annotations

from api.overview import _COUNTS, _SCHEDULES, CAP, LagSampler
from parley.status import TopicLag

EVENTS = "p.conversation-events"


def test_events_per_second_are_the_change_of_written_and_applied_offsets_between_samples() -> None:
    sampler = LagSampler("unused:9092", "g", [EVENTS])
    assert sampler.view(EVENTS)["lag"] is None
    assert sampler.view(EVENTS)["events"] == {
        "topic": EVENTS,
        "in_per_s": None,
        "applied_per_s": None,
        "series": [],
    }

    sampler.samples.append((1000.0, {EVENTS: TopicLag(lag=10, partitions=8, uncommitted=0, end=100)}))
    assert sampler.view(EVENTS)["events"]["series"] == []  # one sample: no rate yet
    # 5 s later: 50 more written, lag down to 0, so 60 applied.
    sampler.samples.append((1005.0, {EVENTS: TopicLag(lag=0, partitions=8, uncommitted=0, end=150)}))
    view = sampler.view(EVENTS)
    assert view["lag"] == {EVENTS: {"lag": 0, "partitions": 8, "uncommitted": 0}}
    assert view["events"]["in_per_s"] == 10.0 and view["events"]["applied_per_s"] == 12.0
    [point] = view["events"]["series"]
    assert point["lag"] == 0 and point["at"].startswith("1970-01-01T00:16:45")

    # A topic recreated (end offsets went down) counts no negative rate.
    sampler.samples.append((1010.0, {EVENTS: TopicLag(lag=0, partitions=8, uncommitted=0, end=3)}))
    assert sampler.view(EVENTS)["events"]["in_per_s"] == 0.0


def test_every_count_stops_at_the_cap() -> None:
    for sql in (_COUNTS, _SCHEDULES):
        assert sql.count("SELECT count(*) FROM (") == sql.count(f"LIMIT {CAP + 1}") > 0
