"""A bench wait that lasts says what it waits for, periodically, and returns the probe's answer."""

from __future__ import annotations

import asyncio

import pytest

from bench.progress import waiting


async def test_a_long_wait_prints_what_it_waits_for(capsys: pytest.CaptureFixture[str]) -> None:
    ticks = asyncio.Event()
    calls = 0

    async def probe() -> str | None:
        nonlocal calls
        calls += 1
        if "waiting for the thing" in capsys.readouterr().err:
            ticks.set()
        return "done" if ticks.is_set() else None

    assert await waiting(probe, 10, "the thing", every=0.1) == "done"
    assert calls > 1
