"""A batch of rows as one JSON parameter: what the batched statements read their rows from.

asyncpg encodes array parameters element by element in Python-facing code (type checks per
value): a 1,000-row `unnest($1::uuid[], $2::text[], ...)` of nine columns costs the worker
~2.8 us of CPU per row. The same rows as one JSON array of arrays (orjson, in C) cost ~0.3 us,
and Postgres reads them as fast or faster (`jsonb_array_elements`, each row parsed once):
measured side by side in `bench/batches.py`'s encoding phase. Postgres has CPU to spare when the
worker is the bottleneck, so the work moves to where it is cheap.

`select(types)` is the row source: `SELECT (r->>0)::uuid, r->>1, ..., n FROM
jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS j(r, n)`, one output column per type and
the row's 1-based position last (ORDER BY it where the order of inserts matters). `dumps(rows)` is
the parameter, sent as text (the pools' jsonb codec would encode a str as a JSON string). Every
statement still reads its batch in one scan, joined by key: linear. A statement that joins the
rows to a table by its key reads them with `probe=True` (see `select`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import orjson

_OPTIONS = orjson.OPT_NAIVE_UTC  # a naive datetime is UTC, as asyncpg's timestamptz takes it


def _default(value: Any) -> Any:
    if isinstance(value, UUID):  # asyncpg's own UUID class (a subclass orjson does not take)
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value")


def dumps(rows: Sequence[Sequence[Any]] | Sequence[Any]) -> str:
    """The rows (tuples of JSON-able values: str, int, None, datetime, UUID) as the parameter."""
    return orjson.dumps(rows, default=_default, option=_OPTIONS).decode()


def _column(i: int, type_: str) -> str:
    if type_ == "text":
        return f"j.r->>{i}"
    if type_ == "jsonb":  # a value that is a JSON document in a string
        return f"(j.r->>{i})::jsonb"
    if type_ == "json":  # a value that is a JSON document in place (a dict in the row): jsonb
        return f"j.r->{i}"
    return f"(j.r->>{i})::{type_}"


def select(types: Sequence[str], param: int = 1, *, probe: bool = False) -> str:
    """The rows of parameter $param, typed: columns in order, then the position n. `probe`: for
    a statement that joins them to a table by its key, so that the join probes the key's index
    per row rather than hashing the rows and scanning the table (migration 0019)."""
    columns = ", ".join(_column(i, t) for i, t in enumerate(types))
    source = f"parley_rows(${param})" if probe else f"jsonb_array_elements(${param}::text::jsonb)"
    return f"SELECT {columns}, j.n FROM {source} WITH ORDINALITY AS j(r, n)"


def values(param: int = 1) -> str:
    """A JSON array of scalars as text values, in order: `SELECT v, n FROM ...`."""
    return f"SELECT j.v, j.n FROM jsonb_array_elements_text(${param}::text::jsonb) WITH ORDINALITY AS j(v, n)"
