"""Hand-made fast paths of hot code agree with what they replace."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams import jsonrows
from streams.records import CONVERSATION_NAMESPACE, conversation_id_for
from streams.topics import partition_of, partitioner


@given(st.text())
def test_conversation_ids_are_uuid5_of_the_event_id(event_id: str) -> None:
    assert conversation_id_for(event_id) == str(uuid.uuid5(CONVERSATION_NAMESPACE, event_id))


@given(st.lists(st.text(min_size=1), max_size=50), st.integers(1, 64))
def test_the_memoised_partitioner_agrees_with_murmur2(keys: list[str], partitions: int) -> None:
    partition = partitioner(partitions)
    for key in keys + keys:  # the second time from the memo
        assert partition(key) == partition_of(key.encode(), partitions)


def test_json_rows_carry_what_the_statements_cast() -> None:
    at = datetime(2026, 12, 2, 9, 30, 1, 123456, tzinfo=timezone(timedelta(hours=-3)))
    naive = datetime(2026, 12, 2, 9, 30)  # noqa: DTZ001 - the naive case on purpose
    rows = [(uuid.UUID(int=1), "text", None, 7, at, naive)]
    decoded = orjson.loads(jsonrows.dumps(rows))
    assert decoded == [
        [
            "00000000-0000-0000-0000-000000000001",
            "text",
            None,
            7,
            "2026-12-02T09:30:01.123456-03:00",
            "2026-12-02T09:30:00+00:00",
        ]
    ]
    assert datetime.fromisoformat(decoded[0][4]) == at and datetime.fromisoformat(decoded[0][5]).tzinfo == UTC


def test_json_rows_refuse_what_no_column_takes() -> None:
    with pytest.raises(TypeError):  # not transient: the batch is bisected and the event parked
        jsonrows.dumps([(object(),)])
