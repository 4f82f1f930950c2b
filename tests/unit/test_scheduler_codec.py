"""The scheduler's compact table values and wheel keys."""

from __future__ import annotations

from agents.scheduler import pack, split_wheel_key, unpack, wheel_key
from domain.actions import CLOSE, close_token, split_close_token


def test_table_values_round_trip_and_stay_small() -> None:
    entries = {
        CLOSE: (close_token("a7832e54-15da-472a-867c-c9dd1be9b563", 3), 1_700_000_000_000),
        "x": ("7", 5),
    }
    assert unpack(pack(entries)) == entries
    assert unpack(None) == {} and unpack(pack({})) == {}
    assert len(pack({CLOSE: entries[CLOSE]})) == 11 + len(CLOSE) + 38  # header, name, token


def test_wheel_keys_split_back_into_owner_and_name() -> None:
    assert split_wheel_key(wheel_key(b"ch/5511", CLOSE)) == (b"ch/5511", CLOSE)
    assert split_close_token(close_token("c-1", 12)) == ("c-1", 12)
