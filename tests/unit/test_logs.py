"""parley/logs.py: JSON lines with the conversation fields; Faust's INFO lines demoted to DEBUG."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pytest

from parley.logs import LibraryInfoToDebug, _library_dirs, configure, handler


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    log = logging.getLogger("agents.test_logs")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    h = handler(logging.INFO, "json", out)
    log.addHandler(h)
    yield log, out
    log.removeHandler(h)
    log.propagate = True


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_level_logger_message_time_and_the_conversation_fields(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    log.error(
        "lifecycle: dead-lettering %s: %s",
        "t[0]@1",
        "bad\nrecord",
        extra={"thread_key": b"wa/5511", "conversation_id": "c-1", "event_id": "e-1"},
    )
    log.info("plain %d", 7)
    assert out.getvalue().count("\n") == 2  # a newline in a message stays inside its one line
    first, second = _lines(out)
    assert first["level"] == "ERROR" and first["logger"] == "agents.test_logs"
    assert first["message"] == "lifecycle: dead-lettering t[0]@1: bad\nrecord"
    assert (first["thread"], first["conversation_id"], first["event_id"]) == ("wa/5511", "c-1", "e-1")
    assert str(first["time"]).endswith("+00:00")
    assert second == {
        "time": second["time"],
        "level": "INFO",
        "logger": "agents.test_logs",
        "message": "plain 7",
    }


def test_json_lines_keep_the_traceback_in_the_object(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    [line] = _lines(out)
    assert line["message"] == "failed" and "ValueError: boom" in str(line["exc_info"])


def _record(name: str, level: int, pathname: str = "/somewhere/else.py") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, "msg", None, None)


@pytest.mark.parametrize("name", ["faust.worker", "mode.services", "aiokafka.consumer.group_coordinator"])
def test_library_info_is_debug(name: str) -> None:
    at_info, at_debug = LibraryInfoToDebug(logging.INFO), LibraryInfoToDebug(logging.DEBUG)
    assert not at_info.filter(_record(name, logging.INFO))
    shown = _record(name, logging.INFO)
    assert at_debug.filter(shown) and shown.levelname == "DEBUG"
    assert at_info.filter(_record(name, logging.WARNING))  # their warnings stay warnings


def test_library_code_logging_under_a_parley_logger_is_demoted_too() -> None:
    # Faust services Parley subclasses log "Starting..." under the subclass's module name.
    [faust_dir] = [d for d in _library_dirs() if d.rstrip(os.sep).endswith("faust")]
    f = LibraryInfoToDebug(logging.INFO)
    assert not f.filter(_record("agents.app", logging.INFO, faust_dir + "transport/producer.py"))
    assert f.filter(_record("agents.app", logging.INFO, "/work/agents/app.py"))
    assert f.filter(_record("agents.scheduler", logging.INFO))


def test_configure_replaces_the_root_handlers_and_refuses_an_unknown_level() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        configure("warning", "json")
        [only] = root.handlers
        assert root.level == logging.WARNING and only.formatter is not None
        with pytest.raises(ValueError, match="PARLEY_LOG_LEVEL"):
            configure("LOUD", "text")
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
