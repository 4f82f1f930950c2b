"""`parley api --processes 2` (here through PARLEY_API_PROCESSES): two aiohttp processes on one
port (SO_REUSEPORT), each answering on its own connections; webhooks accepted by either land in
Postgres; a channel change through one is seen by both; a child's death stops the parent with
exit 1 and the other child with it; SIGTERM to the parent stops both cleanly (exit 0)."""

from __future__ import annotations

import re
import signal
import uuid

import aiohttp
import asyncpg
import psutil
import pytest

from tests.integration.harness import Deployment, GenericChannel, message, wait_until

DEPLOYMENT_ENV = {"PARLEY_API_PROCESSES": "2"}
WEBHOOK_ROUTE = 'parley_api_requests_total{code="200",method="POST",route="/webhooks/generic/{channel_id}"}'


@pytest.fixture(scope="module")
def two(deployment: Deployment) -> Deployment:
    """The module's worker and API (conftest's `deployment`): DEPLOYMENT_ENV gives `parley api`
    two processes."""
    return deployment


def _children(dep: Deployment, label: str = "api") -> list[psutil.Process]:
    return psutil.Process(dep.processes[label].pid).children()


async def _scrape(dep: Deployment) -> tuple[int, float]:
    """(pid, accepted generic webhooks) from /metrics, on a new connection (so SO_REUSEPORT picks
    a process anew)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.get(f"{dep.base_url}/metrics") as r,
    ):
        text = await r.text()
    [pid] = re.findall(r'^parley_api_process_info\{pid="(\d+)"\} 1\.0$', text, re.M)
    accepted = sum(float(v) for v in re.findall(rf"^{re.escape(WEBHOOK_ROUTE)} (\S+)$", text, re.M))
    return int(pid), accepted


async def _each_process(dep: Deployment) -> dict[int, float]:
    """pid -> accepted webhooks, once both processes answered a scrape."""
    seen: dict[int, float] = {}

    async def both() -> bool:
        pid, accepted = await _scrape(dep)
        seen[pid] = accepted
        return len(seen) == 2

    await wait_until(both, 30, "a scrape answered by each of the two processes")
    return seen


async def _post(dep: Deployment, ch: GenericChannel, msg_id: str, key: bytes | None = None) -> int:
    """One signed webhook on a new connection; its status."""
    raw, headers = GenericChannel(ch.id, key or ch.key).signed(message(msg_id, "5511999990000", "oi"))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.post(f"{dep.base_url}/webhooks/generic/{ch.id}", data=raw, headers=headers) as r,
    ):
        return r.status


async def test_both_processes_answer_and_what_either_accepts_lands_in_postgres(two: Deployment) -> None:
    api = two.processes["api"]
    pids = {p.pid for p in _children(two)}
    assert len(pids) == 2 and api.pid not in pids
    assert set(await _each_process(two)) == pids  # the parent serves nothing; each child does

    ch = GenericChannel("two-" + uuid.uuid4().hex[:8])
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{two.base_url}/v1/channels",
            json={"id": ch.id, "provider": "generic", "secret": ch.secret},
            headers=two.admin_headers(),
        ) as r,
    ):
        assert r.status == 201, await r.text()
    ids = [f"p{i}-{uuid.uuid4().hex[:6]}" for i in range(60)]
    for msg_id in ids:  # one connection each: the kernel spreads them over both processes
        assert await _post(two, ch, msg_id) == 200
    accepted = await _each_process(two)
    assert sum(accepted.values()) == len(ids), accepted
    assert all(n > 0 for n in accepted.values()), accepted  # both accepted some (2^-59 otherwise)

    db = await asyncpg.connect(two.database_url)
    try:

        async def stored() -> bool:
            n: int = await db.fetchval(
                "SELECT count(*) FROM messages WHERE channel_id = $1 AND provider_message_id = ANY($2)",
                ch.id,
                ids,
            )
            return n == len(ids)

        await wait_until(stored, 60, "every accepted webhook's row")
    finally:
        await db.close()

    # A rotation through whichever process answers the PATCH is seen by both (each one's cache
    # listens for Postgres' NOTIFY): the revoked secret fails everywhere, the new one verifies.
    new = GenericChannel(ch.id)
    for body in ({"secret": new.secret}, {"revoke_previous": True}):
        async with (
            aiohttp.ClientSession() as http,
            http.patch(f"{two.base_url}/v1/channels/{ch.id}", json=body, headers=two.admin_headers()) as r,
        ):
            assert r.status == 200, await r.text()

    async def revoked_everywhere() -> bool:
        return all([await _post(two, ch, uuid.uuid4().hex) == 401 for _ in range(10)])

    await wait_until(revoked_everywhere, 10, "the old secret to fail on every process")
    for _ in range(20):
        assert await _post(two, ch, uuid.uuid4().hex) == 401
        assert await _post(two, new, uuid.uuid4().hex) == 200


async def test_a_child_dying_stops_the_parent_with_exit_1_and_sigterm_stops_both_with_0(
    two: Deployment,
) -> None:
    async with aiohttp.ClientSession() as http:
        # A child killed -9: the parent stops the other one and exits 1 (the orchestrator restarts
        # the whole; the port never serves on fewer processes than asked for, unnoticed).
        first, second = _children(two)
        first.kill()
        assert two.processes["api"].wait(timeout=60) == 1
        assert not second.is_running()
        two.processes.pop("api")
        log = two.log_of("api")
        dead = r"api-\d \(exit -9\) exited on its own; stopping the other API processes"
        assert re.search(dead, log), log[-3000:]
        assert re.search(r"parley api stopped after a failure in \S+ s: .*exited with -9", log), log[-3000:]

        # Started again: SIGTERM (a container's stop) to the parent alone stops both children
        # cleanly (each flushes its producer) and the parent exits 0.
        two.start("api", label="api")
        await two.wait_ready(http)
        await _each_process(two)  # both serve (a SIGTERM earlier is clean too: they served nothing)
        children = _children(two)
        assert len(children) == 2
        proc = two.processes.pop("api")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert psutil.wait_procs(children, timeout=5)[1] == []
        log = two.log_of("api")
        assert re.search(r"parley api stopped on SIGTERM in \S+ s: api-0 ok, api-1 ok\.", log), log[-3000:]
