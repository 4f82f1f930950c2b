"""apply_isolating finds poison by bisection, keeps order; supervise makes a dead task fatal."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from agents.runner import apply_isolating, supervise


class Poison(Exception):
    pass


async def run(items: list[int], poison: set[int]) -> tuple[list[int], list[int], int]:
    applied: list[int] = []
    parked: list[int] = []
    calls = 0

    async def apply(batch: Sequence[int]) -> None:
        nonlocal calls
        calls += 1
        if poison & set(batch):
            raise Poison(f"{sorted(poison & set(batch))}")
        applied.extend(batch)

    async def park(item: int, exc: BaseException) -> None:
        assert isinstance(exc, Poison)
        parked.append(item)

    await apply_isolating(items, apply, park)
    return applied, parked, calls


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 10_000])
async def test_one_poison_costs_logarithmic_calls_and_keeps_the_rest_in_order(n: int) -> None:
    bad = n // 3
    applied, parked, calls = await run(list(range(n)), {bad})
    assert parked == [bad]
    assert applied == [i for i in range(n) if i != bad]
    assert calls <= 2 * math.ceil(math.log2(n)) + 1


async def test_a_clean_batch_is_one_call() -> None:
    applied, parked, calls = await run(list(range(1000)), set())
    assert (applied, parked, calls) == (list(range(1000)), [], 1)


async def test_several_poisons_are_all_parked_and_nothing_else() -> None:
    poison = {0, 17, 18, 511, 999}
    applied, parked, _ = await run(list(range(1000)), poison)
    assert parked == sorted(poison)
    assert applied == [i for i in range(1000) if i not in poison]


async def test_a_dead_task_is_reported_and_a_cancelled_one_is_not() -> None:
    seen: list[BaseException] = []

    async def dies() -> None:
        raise RuntimeError("writer bug")

    task = asyncio.create_task(dies())
    supervise(task, "writer", seen.append)
    with pytest.raises(RuntimeError):
        await task
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert [str(e) for e in seen] == ["writer bug"]

    blocked = asyncio.Event()
    cancelled = asyncio.create_task(blocked.wait())
    supervise(cancelled, "writer", seen.append)  # type: ignore[arg-type]
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(0)
    assert len(seen) == 1


def test_a_value_postgres_cannot_take_is_not_transient() -> None:
    from asyncpg.exceptions._base import DataError as ClientDataError

    from agents.runner import is_transient

    assert not is_transient(ClientDataError("invalid input for query argument $1: 2147483648"))
    assert is_transient(ConnectionResetError())


def test_a_schema_change_under_a_running_worker_is_transient() -> None:
    import asyncpg

    from agents.runner import is_transient

    # ALTER TABLE conversations while batches run: a cached statement's plan or composite type
    # is stale; asyncpg re-prepares on the next try, so the batch must be retried, not parked.
    assert is_transient(asyncpg.InvalidCachedStatementError("cached plan must not change result type"))
    assert is_transient(asyncpg.exceptions.OutdatedSchemaCacheError("type conversations changed"))
