"""The worker's consumer seeks to the committed offsets again when the assignment changed under
the seek, and forgets its read offsets if it never succeeds (no IO: Faust's seek is a stub)."""

from __future__ import annotations

from typing import Any

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka

from agents.app import _SeekingConsumer


class _Stub(_SeekingConsumer):
    def __init__(self, failures: int) -> None:  # no transport: only what perform_seek touches
        self.failures = failures
        self.seeks = 0
        self.flow_active = True
        self.flow_log: list[str] = []
        self._read_offset: dict[Any, int | None] = {"tp": 41}

    def stop_flow(self) -> None:
        self.flow_active = False
        self.flow_log.append("stop")

    def resume_flow(self) -> None:
        self.flow_active = True
        self.flow_log.append("resume")


@pytest.fixture(autouse=True)
def faust_seek(monkeypatch: pytest.MonkeyPatch) -> None:
    async def seek(self: _Stub) -> None:
        self.seeks += 1
        if self.seeks <= self.failures:
            raise RuntimeError("No current assignment for partition")
        self._read_offset["tp"] = 7  # what Faust's seek does: read offsets from the committed ones

    monkeypatch.setattr(faust_aiokafka.Consumer, "perform_seek", seek)
    monkeypatch.setattr(_SeekingConsumer, "SEEK_ATTEMPTS", 3)


async def test_a_seek_that_fails_while_the_assignment_changes_is_done_again() -> None:
    consumer = _Stub(failures=2)
    await consumer.perform_seek()
    assert consumer.seeks == 3 and consumer._read_offset == {"tp": 7}
    assert consumer.flow_log == ["stop", "resume"]


async def test_a_seek_that_never_succeeds_forgets_the_read_offsets_and_raises() -> None:
    consumer = _Stub(failures=99)
    with pytest.raises(RuntimeError):
        await consumer.perform_seek()
    assert consumer.seeks == 3 and consumer._read_offset == {}  # whatever comes next is delivered
    assert consumer.flow_log == ["stop", "resume"]
