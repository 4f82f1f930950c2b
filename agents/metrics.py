"""The worker's /metrics (Prometheus text format) and /healthz, on its own small port.

Flat counters and gauges come from the agents' own attributes (render); the lifecycle agent's
latency histograms and the consumer lag per partition come from a prometheus-client registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

Gauges = Callable[[], dict[str, float]]
# None when healthy, else why not (e.g. the lifecycle writer died and the worker is stopping).
Health = Callable[[], str | None]


REGISTRY = CollectorRegistry()
BATCH_SECONDS = Histogram(
    "parley_worker_batch_seconds",
    "Time to handle one batch: decode, apply in one transaction, arm its timers",
    ["agent"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
EVENT_AGE_SECONDS = Histogram(
    "parley_worker_event_age_seconds",
    "From the record's Kafka timestamp to the end of the batch that applied it",
    ["agent"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
Lag = Callable[[], dict[tuple[str, int], int]]


class LagCollector(Collector):
    """parley_consumer_lag{topic,partition}: records not yet committed by this worker's consumer
    (the partition's end offset minus the committed one), for the partitions it is assigned."""

    def __init__(self, lag: Lag) -> None:
        self.lag = lag

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "parley_consumer_lag",
            "Records behind the end of each assigned partition",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(self.lag().items()):
            family.add_metric([topic, str(partition)], value)
        yield family


def render(values: dict[str, float]) -> str:
    """Prometheus exposition text for flat name -> value pairs, every digit kept (a timestamp in
    seconds with its ms would lose them to %g alone)."""
    return "".join(f"{name} {_number(value)}\n" for name, value in sorted(values.items()))


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    short = format(value, "g")
    return short if float(short) == value else repr(value)


async def serve(host: str, port: int, gauges: Gauges, health: Health, lag: Lag) -> web.AppRunner:
    """Start the metrics server; the caller keeps the runner to stop it."""
    registry = CollectorRegistry()
    registry.register(LagCollector(lag))

    async def metrics(request: web.Request) -> web.Response:
        text = render(gauges()) + generate_latest(REGISTRY).decode() + generate_latest(registry).decode()
        return web.Response(text=text, content_type="text/plain")

    async def healthz(request: web.Request) -> web.Response:
        problem = health()
        if problem is not None:
            return web.json_response({"status": "failing", "reason": problem}, status=503)
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
