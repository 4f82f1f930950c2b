"""The pause switch, without IO: which intakes and engines a paused_parts set holds."""

from __future__ import annotations

from typing import Any, cast

import pytest

from agents.batching import BatchIntake
from agents.lanes import LaneEngine
from agents.pause import PauseSwitch
from streams.pause_db import PARTS, parts_of


def _intake() -> BatchIntake:
    return BatchIntake(cast(Any, None), "t", 10)


def test_parts_of_names_one_part_or_all() -> None:
    assert parts_of("all") == PARTS
    assert parts_of("sender") == ("sender",)
    with pytest.raises(ValueError, match="lifecycle, sender, webhooks or all"):
        parts_of("everything")


def test_a_paused_part_holds_its_intake_and_engine_and_resuming_wakes_it() -> None:
    switch = PauseSwitch("postgresql://unused")
    lifecycle, hooks = _intake(), _intake()
    engine: LaneEngine[Any] = LaneEngine()
    switch.add("lifecycle", lifecycle)
    switch.add("webhooks", hooks, engine)
    woken: list[LaneEngine[Any]] = []
    # held until the table is first read: a worker starting while paused takes nothing meanwhile
    assert not lifecycle.running.is_set() and not hooks.running.is_set() and engine.paused

    switch.apply({"webhooks", "sender"}, woken.append)  # sender: not a part of this switch
    assert switch.paused == {"webhooks"}
    assert not hooks.running.is_set() and engine.paused
    assert lifecycle.running.is_set()
    assert woken == []  # lifecycle resumed at the first read, but has no engine to wake

    switch.apply({"webhooks", "lifecycle"}, woken.append)
    assert not lifecycle.running.is_set() and not hooks.running.is_set()

    switch.apply(set(), woken.append)
    assert lifecycle.running.is_set() and hooks.running.is_set() and not engine.paused
    assert woken == [engine]
