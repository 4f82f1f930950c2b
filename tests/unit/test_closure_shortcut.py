"""The closure detector's shortcut (no word can start a signal phrase: score 0) never changes a
score: checked against the full lookup on texts mixing phrase words with others."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.closure_intent import (
    CLOSE_REQUESTS,
    CONTINUATIONS,
    FAREWELLS,
    THANKS,
    PhraseClosureDetector,
    _clauses,
)

VOCABULARY = sorted(
    {
        w.rstrip("*")
        for table in (CLOSE_REQUESTS, FAREWELLS, THANKS, CONTINUATIONS)
        for p in table
        for w in p.split()
    }
    | {"pedido", "entrega", "hello", "order", "não", "ok", "sim", "?", ",", "!", "obrigadão", "tchauzinho"}
)
DETECTOR = PhraseClosureDetector()


@settings(max_examples=400)
@given(st.lists(st.sampled_from(VOCABULARY), min_size=0, max_size=12))
def test_the_shortcut_agrees_with_the_full_lookup(words: list[str]) -> None:
    text = " ".join(words)
    assert DETECTOR.confidence(text) == DETECTOR.score(_clauses(text), text)
