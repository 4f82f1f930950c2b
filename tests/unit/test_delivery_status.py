"""The delivery-status lattice: forward only, order and duplicates do not matter."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.delivery_status import DeliveryStatus as S
from domain.delivery_status import advance, from_provider


@pytest.mark.parametrize(
    ("current", "incoming", "expected"),
    [
        (None, S.SENT, S.SENT),
        (S.SENT, S.DELIVERED, S.DELIVERED),
        (S.DELIVERED, S.SENT, S.DELIVERED),  # a late sent changes nothing
        (S.SENT, S.READ, S.READ),  # read first implies delivered
        (S.READ, S.DELIVERED, S.READ),
        (S.SENT, S.FAILED, S.FAILED),
        (S.FAILED, S.SENT, S.FAILED),  # failed is terminal for queued/sent
        (S.FAILED, S.DELIVERED, S.DELIVERED),  # another device got it
        (S.DELIVERED, S.FAILED, S.DELIVERED),
        (S.READ, S.PLAYED, S.PLAYED),
        (S.QUEUED, S.QUEUED, S.QUEUED),
    ],
)
def test_advance_table(current: S | None, incoming: S, expected: S) -> None:
    assert advance(current, incoming) == expected


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("accepted", S.QUEUED),
        ("sending", S.QUEUED),
        ("sent", S.SENT),
        ("undelivered", S.FAILED),
        ("DELIVERED", S.DELIVERED),
        ("read", S.READ),
        ("played", S.PLAYED),
        ("received", None),
        ("deleted", None),
    ],
)
def test_provider_words(word: str, status: S | None) -> None:
    assert from_provider(word) == status


@given(st.lists(st.sampled_from(list(S)), min_size=1, max_size=12))
def test_any_order_and_repeats_give_the_highest(receipts: list[S]) -> None:
    folded = functools.reduce(advance, receipts, None)
    assert folded == max(receipts, key=lambda s: s.rank)
    assert functools.reduce(advance, reversed(receipts), None) == folded
