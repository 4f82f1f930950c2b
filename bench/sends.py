"""Outbound sends: API -> lifecycle agent -> outbox -> <prefix>.sends -> sender -> provider.

The provider is the simulator (sandbox/simulator.py) in its own process, so its CPU is counted
apart; its status webhooks back to Parley are switched off (each send would bring three, which
would load the API and the worker with receipts, not with sends). Every send is a
business-initiated template (`POST /v1/channels/{id}/messages`) to its own `to`, so only the
number's limit applies; each opens its thread's conversation. Figures, each beside the same
run's baselines (raw aiokafka produce+consume; raw aiohttp POSTs of the same Graph request to the
simulator with the sender's concurrency, PARLEY_SEND_CONCURRENCY 64, from their own process):

1. limits off (simulator: no throughput limit, no pair rate; channel throughput 10,000 (the
   API's maximum), recipient rate/burst 1,000): (a) flat out through the API (64 requests in
   flight): the API's 202 rate, and sends/s at the simulator (first to last acceptance);
   (b) the sender alone: the channel is paused while the sends are queued, then resumed (PATCH
   access_token), and sends/s is first to last acceptance of that backlog;
2. accept-to-provider latency at a paced 500 requests/s for 20 s: the API's 202 -> the
   simulator's acceptance time (`at`, same machine clock);
3. the 80/s limit on (simulator throughput 80, channel throughput 80): a backlog of 30 s worth
   (2,400 sends, queued while paused, then resumed): achieved rate, the simulator's max count in
   any 1 s window, and the 130429 refusals.

`python -m bench.sends post URL TOKEN N CONCURRENCY` is the raw-POST baseline's own process.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import uvloop

from bench import baselines, cpu
from bench.progress import waiting
from bench.stats import row, summary_ms
from channels import outbound
from parley.localstack import ROOT, die_with_parent, free_port, stop
from tests.integration.harness import Deployment, Services, wait_until
from tests.integration.schedule_helpers import call

ENV = {
    "PARLEY_OUTBOUND_ALLOW_HTTP": "true",
    "PARLEY_OUTBOUND_ALLOW_PRIVATE": "true",  # the simulator is on loopback
}
CONCURRENCY = 64  # PARLEY_SEND_CONCURRENCY's default: the raw baseline and the API load use it too
GRAPH_VERSION = "v21.0"
UNLIMITED = 1_000_000  # the simulator's throughput "off"


@dataclass
class Sim:
    """The simulator process, one WhatsApp number configured at start."""

    port: int
    proc: subprocess.Popen[bytes]
    token: str
    secret: str

    @property
    def url(self) -> str:
        """Base URL of the Graph API and the control API."""
        return f"http://127.0.0.1:{self.port}"

    async def number(
        self, http: aiohttp.ClientSession, phone: str, throughput: int, pair_burst: float
    ) -> None:
        """Configure (or reconfigure, limits afresh) a business number."""
        body = {
            "phone_number_id": phone,
            "token": self.token,
            "app_secret": self.secret,
            "throughput": throughput,
            "pair_burst": pair_burst,
        }
        async with http.post(f"{self.url}/_sim/whatsapp/numbers", json=body) as r:
            assert r.status == 200, await r.text()

    async def no_webhooks(self, http: aiohttp.ClientSession) -> None:
        """Status webhooks off: the load is sends only."""
        async with http.put(f"{self.url}/_sim/webhooks", json={"enabled": False}) as r:
            assert r.status == 200, await r.text()

    async def reset(self, http: aiohttp.ClientSession) -> None:
        """Forget accepted sends and refusals (numbers stay, limiters refilled)."""
        async with http.post(f"{self.url}/_sim/reset") as r:
            assert r.status == 200, await r.text()

    async def stats(self, http: aiohttp.ClientSession, sends: bool) -> dict[str, Any]:
        """The simulator's stats (with every accepted send when `sends`)."""
        async with http.get(f"{self.url}/_sim/stats", params={"sends": "1" if sends else "0"}) as r:
            got: dict[str, Any] = orjson.loads(await r.read())
            return got

    async def wait_accepted(self, http: aiohttp.ClientSession, n: int, timeout: float) -> dict[str, Any]:
        """Until n sends were accepted; then every accepted send. Polled slowly: a stats call
        copies every accepted send, which costs the simulator CPU during the measurement."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("the simulator exited")
            got = (await self.stats(http, sends=False))["accepted_count"]
            if got >= n:
                return await self.stats(http, sends=True)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {got:,} of {n:,} sends accepted")
            await asyncio.sleep(0.5)  # polling the simulator, see above


@contextmanager
def simulator_process(parley_url: str) -> Iterator[Sim]:
    """`python -m sandbox.simulator` on a free port; stopped afterwards."""
    port = free_port()
    token, secret = secrets.token_hex(16), secrets.token_hex(16)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sandbox.simulator",
            "--port",
            str(port),
            "--parley",
            parley_url,
            "--whatsapp",
            f"100000000000009:{token}:{secret}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        yield Sim(port, proc, token, secret)
    finally:
        stop(proc)


async def channel(
    http: aiohttp.ClientSession,
    dep: Deployment,
    sim: Sim,
    *,
    throughput: int,
    sim_throughput: int,
    pair_burst: float,
    paused: bool,
) -> tuple[str, str]:
    """A WhatsApp channel sending to a fresh simulator number; (channel id, phone number id).
    With `paused`, its sends stay queued until resume() (the pause is stored before the channel
    exists, so the sender never sees it unpaused)."""
    channel_id = "bench-" + uuid.uuid4().hex[:8]
    phone = str(10**14 + int(uuid.uuid4().int % 10**14))
    await sim.number(http, phone, sim_throughput, pair_burst)
    if paused:
        conn = await asyncpg.connect(dep.database_url)
        try:
            await conn.execute(
                "INSERT INTO channel_send_state (channel_id, paused, reason, updated_at)"
                " VALUES ($1, true, 'bench: queue a backlog first', now())",
                channel_id,
            )
        finally:
            await conn.close()
    code, body = await call(
        http,
        dep,
        "POST",
        "/v1/channels",
        {
            "id": channel_id,
            "provider": "whatsapp",
            "phone_number_id": phone,
            "app_secret": sim.secret,
            "verify_token": secrets.token_hex(8),
            "access_token": sim.token,
            "graph_base": sim.url,
            "throughput": throughput,
            "recipient_rate": 1000,
            "recipient_burst": 1000,
        },
    )
    assert code == 201, body
    return channel_id, phone


async def resume(http: aiohttp.ClientSession, dep: Deployment, sim: Sim, channel_id: str) -> float:
    """Resume a paused channel (PATCH its token, as after a refused token); the time of the 200."""
    code, body = await call(http, dep, "PATCH", f"/v1/channels/{channel_id}", {"access_token": sim.token})
    assert code == 200, body
    return time.time()


def template(to: str) -> dict[str, Any]:
    """A business-initiated template message to `to`."""
    return {"to": to, "type": "template", "name": "promo", "language": "en_US"}


def recipients(n: int) -> list[str]:
    """n distinct recipients, fresh per call."""
    base = 10**11 + uuid.uuid4().int % 10**10 * 10
    return [str(55 * 10**12 + (base + i) % 10**12) for i in range(n)]


async def post_sends(
    http: aiohttp.ClientSession,
    dep: Deployment,
    channel_id: str,
    tos: list[str],
    concurrency: int,
    rate: float | None = None,
) -> tuple[float, dict[str, float]]:
    """POST a template to each `to` (`concurrency` in flight, paced at `rate`/s when given);
    (202s per second first request to last answer, message id -> unix time of its 202)."""
    url = f"{dep.base_url}/v1/channels/{channel_id}/messages"
    headers = {**dep.admin_headers(), "Content-Type": "application/json"}
    answered: dict[str, float] = {}
    next_i = 0
    start = time.perf_counter()

    async def lane() -> None:
        nonlocal next_i
        while next_i < len(tos):
            i = next_i
            next_i += 1
            if rate is not None:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the offered load
            async with http.post(url, data=orjson.dumps(template(tos[i])), headers=headers) as r:
                body = await r.read()
                assert r.status == 202, (r.status, body[:300])
                answered[orjson.loads(body)["id"]] = time.time()

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return len(tos) / (time.perf_counter() - start), answered


async def metric(http: aiohttp.ClientSession, dep: Deployment, name: str) -> float:
    """One gauge of the worker's /metrics."""
    async with http.get(f"http://127.0.0.1:{dep.metrics_port}/metrics") as r:
        text = await r.text()
    found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    if found is None:
        raise AssertionError(f"no {name} in the worker's metrics")
    return float(found.group(1))


async def backlog(http: aiohttp.ClientSession, dep: Deployment, n: int) -> None:
    """Until the sender holds n open sends (queued, waiting for the paused channel)."""

    async def held() -> bool:
        return await metric(http, dep, "parley_sends_pending") >= n

    await waiting(held, 300, f"the sender to hold {n:,} queued sends")


def span(accepted: list[dict[str, Any]], phone: str) -> tuple[float, float, int, int]:
    """(first, last) acceptance time at the simulator of this number, sends, unique messages."""
    mine = [a for a in accepted if a["number"] == phone]
    times = [a["at"] for a in mine]
    return min(times), max(times), len(mine), len({a["parley_message_id"] for a in mine})


async def raw_graph(sim: Sim, phone: str, n: int) -> tuple[float, dict[str, float]]:
    """The raw aiohttp POST baseline (own uvloop process): Graph requests/s and CPU use."""
    usage: dict[str, float] = {}
    with cpu.accounting(usage):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.sends",
            "post",
            f"{sim.url}/{GRAPH_VERSION}/{phone}/messages",
            sim.token,
            str(n),
            str(CONCURRENCY),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 600)
    found = re.search(r"RATE (\d+)", out.decode(errors="replace"))
    if found is None:
        raise RuntimeError(f"the raw POST run printed no rate: {out[-500:]!r}")
    return float(found.group(1)), usage


async def run(services: Services, scale: float) -> None:
    """Every sends figure, printed as measured, with its ratio to the same run's baselines."""
    n = int(10_000 * scale)
    print("\n== outbound sends: baselines (same run) ==", flush=True)
    kafka_rate = await baselines.kafka_produce_consume(services.bootstrap, int(200_000 * scale))
    row("raw aiokafka produce+consume (acks=all, 300 B)", f"{kafka_rate:,.0f} msg/s")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        dep = Deployment(services, extra_env=ENV)
        with simulator_process(dep.base_url) as sim:
            await wait_until(lambda: _alive(http, sim), 30, "the simulator to listen")
            await sim.no_webhooks(http)
            raw_phone = "100000000000008"
            await sim.number(http, raw_phone, UNLIMITED, 1e9)
            http_rate, usage = await raw_graph(sim, raw_phone, n)
            row(
                f"raw aiohttp POST -> simulator Graph route ({n:,}, {CONCURRENCY} in flight)",
                f"{http_rate:,.0f} req/s",
            )
            print(f"    CPU: {cpu.describe(usage)}", flush=True)
            await sim.reset(http)

            await dep.create_database()
            dep.start("worker")
            dep.start("api")
            try:
                await dep.wait_ready(http)
                await _phases(http, dep, sim, n, scale, kafka_rate, http_rate)
            finally:
                dep.stop_all()


async def _phases(
    http: aiohttp.ClientSession,
    dep: Deployment,
    sim: Sim,
    n: int,
    scale: float,
    kafka_rate: float,
    http_rate: float,
) -> None:
    print("\n== outbound sends, limits off: API -> worker -> simulator ==", flush=True)
    ch, phone = await channel(
        http, dep, sim, throughput=10_000, sim_throughput=UNLIMITED, pair_burst=1e9, paused=False
    )
    await _warm(http, dep, sim, ch)
    usage: dict[str, float] = {}
    with cpu.accounting(usage):
        started = time.time()
        api_rate, _ = await post_sends(http, dep, ch, recipients(n), CONCURRENCY)
        posted = time.time()
        stats = await sim.wait_accepted(http, n, 600)
    first, last, sends, unique = span(stats["accepted"], phone)
    rate = unique / (last - first)
    row(
        f"API 202s, flat out ({n:,} templates, {CONCURRENCY} in flight)",
        f"{api_rate:,.0f} /s",
        f"= {api_rate / http_rate:.2f}x raw aiohttp POST, {api_rate / kafka_rate:.3f}x raw Kafka",
    )
    row(
        "  sends/s at the simulator (first to last acceptance)",
        f"{rate:,.0f} /s",
        f"= {rate / http_rate:.2f}x raw aiohttp POST, {rate / kafka_rate:.3f}x raw Kafka (target 3,000/s)",
    )
    row(
        "  first POST -> last acceptance",
        f"{last - started:.1f} s",
        f"(POSTs took {posted - started:.1f} s; first acceptance after {first - started:.2f} s;"
        f" {sends - unique} duplicates)",
    )
    print(f"    CPU: {cpu.describe(usage)}", flush=True)

    await sim.reset(http)
    ch, phone = await channel(
        http, dep, sim, throughput=10_000, sim_throughput=UNLIMITED, pair_burst=1e9, paused=True
    )
    queue_started = time.time()
    await post_sends(http, dep, ch, recipients(n), CONCURRENCY)
    await backlog(http, dep, n)
    queued_in = time.time() - queue_started
    usage = {}
    with cpu.accounting(usage):
        resumed = await resume(http, dep, sim, ch)
        stats = await sim.wait_accepted(http, n, 600)
    first, last, sends, unique = span(stats["accepted"], phone)
    rate = unique / (last - first)
    row(
        f"sender alone: a backlog of {n:,} queued sends, resumed",
        f"{rate:,.0f} /s",
        f"= {rate / http_rate:.2f}x raw aiohttp POST, {rate / kafka_rate:.3f}x raw Kafka (target 3,000/s)",
    )
    row(
        "  resume -> first / last acceptance",
        f"{first - resumed:.2f} / {last - resumed:.1f} s",
        f"(queueing them took {queued_in:.1f} s; {sends - unique} duplicates)",
    )
    print(f"    CPU: {cpu.describe(usage)}", flush=True)

    print("\n== outbound sends: accept-to-provider latency ==", flush=True)
    await sim.reset(http)
    offered = 500
    m = int(offered * 20 * scale)
    usage = {}
    with cpu.accounting(usage):
        achieved, answered = await post_sends(http, dep, ch, recipients(m), CONCURRENCY, rate=offered)
        stats = await sim.wait_accepted(http, m, 600)
    seen: dict[str, float] = {}
    for a in stats["accepted"]:
        seen.setdefault(a["parley_message_id"], a["at"])
    lat = [seen[i] - t for i, t in answered.items()]
    row(
        f"202 -> accepted at the simulator, {offered}/s ({m:,} sends)",
        summary_ms(lat),
        f"(target p99 50 ms; {achieved:,.0f}/s achieved)",
    )
    print(f"    CPU: {cpu.describe(usage)}", flush=True)

    print("\n== outbound sends: the number's limit (80/s) ==", flush=True)
    await sim.reset(http)
    limit = 80
    k = int(limit * 30 * max(scale, 0.34))
    ch, phone = await channel(
        http, dep, sim, throughput=limit, sim_throughput=limit, pair_burst=45, paused=True
    )
    await post_sends(http, dep, ch, recipients(k), CONCURRENCY)
    await backlog(http, dep, k)
    usage = {}
    with cpu.accounting(usage):
        await resume(http, dep, sim, ch)
        stats = await sim.wait_accepted(http, k, 600)
    first, last, sends, unique = span(stats["accepted"], phone)
    achieved_rate = (unique - 1) / (last - first)
    row(
        f"achieved rate, a backlog of {k:,} (~{k / limit:.0f} s) at the 80/s limit",
        f"{achieved_rate:,.1f} /s",
        f"= {achieved_rate / limit:.3f}x the limit (target within 5%; paced at 0.98x)",
    )
    row(
        "  simulator: max accepted in any 1 s window",
        f"{stats['max_in_any_second'].get(phone, 0)}",
        "(must never exceed 80)",
    )
    row(
        "  simulator: 130429 refusals / duplicates",
        f"{stats['rejected'].get('130429', 0)} / {sends - unique}",
        "(should be 0 / 0)",
    )
    print(f"    CPU: {cpu.describe(usage)}", flush=True)


async def _warm(http: aiohttp.ClientSession, dep: Deployment, sim: Sim, channel_id: str) -> None:
    """A few sends first: the sender knows the channel and holds connections; then reset."""
    _, ids = await post_sends(http, dep, channel_id, recipients(20), 4)
    await sim.wait_accepted(http, len(ids), 60)
    await sim.reset(http)


async def _alive(http: aiohttp.ClientSession, sim: Sim) -> bool:
    try:
        await sim.stats(http, sends=False)
        return True
    except aiohttp.ClientError:
        return False


async def post(url: str, token: str, n: int, concurrency: int) -> float:
    """Graph requests per second of n raw POSTs, the sender's body and headers, `concurrency` in
    flight over one pooled session (the HTTP ceiling of this box)."""
    base, _, phone = url.removesuffix("/messages").rpartition("/")
    graph_base, _, version = base.rpartition("/")
    content = outbound.OUTBOUND_CONTENT.validate_python(
        {"type": "template", "name": "promo", "language": "en_US"}
    )
    tos = recipients(n)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        next_i = 0

        async def lane() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                req = outbound.whatsapp_request(
                    graph_base=graph_base,
                    version=version,
                    phone_number_id=phone,
                    access_token=token,
                    to=tos[i],
                    content=content,
                    message_id=str(uuid.uuid4()),
                )
                async with http.post(req.url, data=req.body, headers=req.headers) as r:
                    await r.read()
                    assert r.status == 200, r.status

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


def main() -> None:
    """post URL TOKEN N CONCURRENCY."""
    if sys.argv[1] != "post":
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
    uvloop.install()
    rate = asyncio.run(post(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    print(f"RATE {rate:.0f}", flush=True)


if __name__ == "__main__":
    main()
