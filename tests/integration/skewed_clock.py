"""`python -m tests.integration.skewed_clock SECONDS PART`: run `parley PART` with its wall clock
SECONDS off (time.time, datetime.now; the monotonic clock is untouched), as on a host whose
clock drifted. Only the integration tests use it."""

from __future__ import annotations

import sys
import time

import time_machine

from parley.cli import main

if __name__ == "__main__":
    offset, part = float(sys.argv[1]), sys.argv[2]
    with time_machine.travel(time.time() + offset, tick=True):
        sys.exit(main([part]))
