"""Logging of every Parley process: one handler on the root logger, text (default) or JSON lines.

- `PARLEY_LOG_FORMAT=json`: one JSON object per line with `time`, `level`, `logger`, `message` and,
  where the code knows them, `conversation_id`, `thread` and `event_id`: a call passes them as
  `log.error("...", extra={"thread_key": key})` (the text format leaves them out: the message says it).
- Faust's, mode's and aiokafka's INFO lines (start-up banners, subscription and assignment tables,
  every service's "Starting..."/"Stopping...") are logged as DEBUG: at the default level the console
  shows Parley's own lines; `PARLEY_LOG_LEVEL=DEBUG` brings theirs back. Their warnings and errors
  are untouched.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

# JSON field -> the record attribute a call's `extra=` sets (`thread` is taken: LogRecord's thread id).
CONTEXT_FIELDS = {"conversation_id": "conversation_id", "thread": "thread_key", "event_id": "event_id"}
LIBRARIES = frozenset({"faust", "mode", "aiokafka"})
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def context_of(record: logging.LogRecord) -> dict[str, str]:
    """The conversation_id/thread/event_id a record carries (its `extra=`), as strings."""
    found: dict[str, str] = {}
    for name, attribute in CONTEXT_FIELDS.items():
        value = record.__dict__.get(attribute)
        if value is not None:
            found[name] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **context_of(record),
        }
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def _library_dirs() -> tuple[str, ...]:
    # Located without importing them (the API process never imports Faust).
    dirs = []
    for name in sorted(LIBRARIES):
        # Imported already: its __path__ (faust replaces its module by one whose __spec__ is None).
        locations = getattr(sys.modules.get(name), "__path__", None)
        if locations is None:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            locations = (spec.submodule_search_locations or []) if spec else []
        dirs += [os.path.join(location, "") for location in locations]
    return tuple(dirs)


class LibraryInfoToDebug(logging.Filter):
    """Faust's, mode's and aiokafka's INFO records become DEBUG; then the handler's level applies.

    A library's record is one from its loggers, or one its code emitted through another logger:
    Faust services Parley subclasses (agents/app.py) log "Starting..." under Parley's module name.
    """

    def __init__(self, level: int, library_dirs: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.level = level
        self.dirs = _library_dirs() if library_dirs is None else library_dirs
        self._seen: dict[str, bool] = {}

    def _from_library(self, record: logging.LogRecord) -> bool:
        if record.name.partition(".")[0] in LIBRARIES:
            return True
        found = self._seen.get(record.pathname)
        if found is None:
            found = self._seen[record.pathname] = record.pathname.startswith(self.dirs)
        return found

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and self._from_library(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.level


def handler(level: int, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """The one handler of a Parley process (stderr by default)."""
    out = logging.StreamHandler(stream if stream is not None else sys.stderr)
    out.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    out.addFilter(LibraryInfoToDebug(level))
    return out


def configure(level: str, fmt: str) -> None:
    """Replace the root logger's handlers with Parley's one handler at `level`."""
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"PARLEY_LOG_LEVEL: unknown level {level!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(number, fmt))
    root.setLevel(number)
