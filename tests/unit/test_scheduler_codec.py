"""The scheduler's compact table values and wheel keys."""

from __future__ import annotations

from agents.scheduler import collect, entries_of, pack, split_wheel_key, unpack, wheel_key
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
    assert split_wheel_key(wheel_key(b"ch/5511", "retry")) == (b"ch/5511", "retry")
    assert split_wheel_key(wheel_key(b"schedule:k", "fire")) == (b"schedule:k", "fire")


def test_a_close_deadline_is_keyed_by_the_owner_object_itself() -> None:
    owner = b"ch/" + b"5511"  # built at run time: not an interned constant
    assert wheel_key(owner, CLOSE) is owner
    assert wheel_key(owner, "retry") != owner


def test_rows_collected_per_owner_are_the_table_value_pack_makes() -> None:
    wanted: dict[bytes, bytes] = {}
    collect(wanted, "a/1", CLOSE, "c:1", 10)
    collect(wanted, "a/2", CLOSE, "c:2", 20)
    collect(wanted, "a/1", "retry", "r:1", 30)
    assert unpack(wanted[b"a/1"]) == {CLOSE: ("c:1", 10), "retry": ("r:1", 30)}
    assert wanted[b"a/2"] == pack({CLOSE: ("c:2", 20)})
    assert list(entries_of(wanted[b"a/1"])) == [(CLOSE, 10), ("retry", 30)]
    assert list(entries_of(b"")) == []
    assert split_close_token(close_token("c-1", 12)) == ("c-1", 12)
