"""/metrics on a live deployment. The API's: requests by route template and code, latency and
produce histograms, provider webhooks rejected by reason. The worker's: consumer lag per
partition and the lifecycle agent's batch and event-age histograms."""

from __future__ import annotations

import uuid

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from streams.topics import Topics
from tests.integration.harness import Deployment, GenericChannel, message, wait_until
from tests.integration.worker_helpers import metrics


async def _samples(
    http: aiohttp.ClientSession, dep: Deployment
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with http.get(f"{dep.base_url}/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_requests_latency_produce_and_rejections_are_counted(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    before = await _samples(http, deployment)
    url = f"{deployment.base_url}/webhooks/generic/{channel.id}"
    for _ in range(3):
        raw, headers = channel.signed(message(uuid.uuid4().hex, "5511900000001", "hi"))
        async with http.post(url, data=raw, headers=headers) as r:
            assert r.status == 200, await r.text()
    raw, headers = channel.signed(message(uuid.uuid4().hex, "5511900000001", "hi"))
    headers["webhook-signature"] = "v1,AAAA"
    async with http.post(url, data=raw, headers=headers) as r:
        assert r.status == 401
    async with http.post(url, data=b"{not json", headers=channel.signed(b"{not json")[1]) as r:
        assert r.status == 400
    missing = str(uuid.uuid4())
    async with http.get(
        f"{deployment.base_url}/v1/conversations/{missing}", headers=deployment.admin_headers()
    ) as r:
        assert r.status == 404

    after = await _samples(http, deployment)

    def delta(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    route = "/webhooks/generic/{channel_id}"
    assert delta("parley_api_requests_total", route=route, method="POST", code="200") == 3
    assert delta("parley_api_requests_total", route=route, method="POST", code="401") == 1
    assert delta("parley_api_webhook_rejections_total", provider="generic", reason="signature") == 1
    assert delta("parley_api_webhook_rejections_total", provider="generic", reason="malformed") == 1
    conv = "/v1/conversations/{id}"
    assert delta("parley_api_requests_total", route=conv, method="GET", code="404") == 1
    assert delta("parley_api_request_duration_seconds_count", route=route, method="POST") == 5
    assert delta("parley_api_produce_duration_seconds_count") >= 3  # one per accepted webhook
    assert not any(missing in str(labels) for _, labels in after)  # templates, never raw ids


async def test_the_worker_shows_lag_per_partition_and_latency_histograms(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    url = f"{deployment.base_url}/webhooks/generic/{channel.id}"
    for i in range(5):
        raw, headers = channel.signed(message(uuid.uuid4().hex, f"55119100000{i:02d}", "hi"))
        async with http.post(url, data=raw, headers=headers) as r:
            assert r.status == 200, await r.text()
    topic = Topics(deployment.name).conversation_events

    async def caught_up() -> dict[str, float] | None:
        got = await metrics(http, deployment)
        lag = {
            k: v for k, v in got.items() if k.startswith("parley_consumer_lag{") and f'topic="{topic}"' in k
        }
        applied = got.get('parley_worker_event_age_seconds_count{agent="lifecycle"}', 0)
        return got if len(lag) == 8 and sum(lag.values()) == 0 and applied >= 5 else None

    got = await wait_until(caught_up, 60, "8 partitions with no lag and 5 events applied")
    assert got['parley_worker_batch_seconds_count{agent="lifecycle"}'] >= 1
    assert got['parley_worker_event_age_seconds_bucket{agent="lifecycle",le="+Inf"}'] >= 5
