"""`python -m tests.integration.broken_writer`: `parley worker` whose lifecycle writer dies on its
first batch (a stand-in for a bug), to test that a dead writer ends the worker. Tests only."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from agents.lifecycle import LifecycleAgent
from parley.cli import main


async def _broken(self: LifecycleAgent, batch: Sequence[Any]) -> None:
    raise RuntimeError("injected writer bug")


if __name__ == "__main__":
    LifecycleAgent.handle = _broken  # type: ignore[method-assign]
    sys.exit(main(["worker"]))
