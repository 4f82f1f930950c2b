"""Tests for domain.closure_intent: farewells per language, false friends, questions, replies."""

from __future__ import annotations

import pytest

from domain.closure_intent import (
    ClosureDetector,
    PhraseClosureDetector,
    classify_reply,
    detect_closure,
)

THRESHOLD, UNAMBIGUOUS = 0.7, 0.95  # LifecyclePolicy defaults

# (text, lowest expected confidence, highest expected confidence)
Row = tuple[str, float, float]
CLOSE = (UNAMBIGUOUS, 1.0)  # closes without asking
CONFIRM = (THRESHOLD, UNAMBIGUOUS - 1e-9)  # asks "may we close?"
NOTHING = (0.0, THRESHOLD - 1e-9)  # conversation goes on

PORTUGUESE: list[Row] = [
    ("tchau", *CONFIRM),
    ("Tchauzinho!", *CONFIRM),
    ("TCHAU TCHAU", *CONFIRM),
    ("até mais", *CONFIRM),
    ("Até logo, obrigada", *CONFIRM),
    ("obrigado, pode fechar", *CLOSE),
    ("pode encerrar", *CLOSE),
    ("Ok, pode fechar então", *CLOSE),
    ("Não, pode fechar", *CLOSE),
    ("pode finalizar o atendimento", *CLOSE),
    ("pode fechar?", *CONFIRM),
    ("Obrigado!", *NOTHING),
    ("valeu", *NOTHING),
    ("Posso fazer outra pergunta?", *NOTHING),
    ("obrigado, tchau! posso fazer outra pergunta?", *NOTHING),
    ("não pode fechar ainda", *NOTHING),
    ("não quero fechar a conta", *NOTHING),
    ("pode fechar minha conta", *NOTHING),
    ("o boleto não chegou", *NOTHING),
]
ENGLISH: list[Row] = [
    ("bye", *CONFIRM),
    ("Goodbye!", *CONFIRM),
    ("thanks, bye", *CONFIRM),
    ("see you", *CONFIRM),
    ("you can close this", *CLOSE),
    ("Thank you, you may close the chat", *CLOSE),
    ("please close the ticket", *CLOSE),
    ("bypass the proxy", *NOTHING),
    ("the byelaws changed", *NOTHING),
    ("happy thanksgiving, see youtube", *NOTHING),
    ("byte order", *NOTHING),
    ("thanks!", *NOTHING),
    ("thanks, one more question", *NOTHING),
    ("please close my account", *NOTHING),
    ("I don't know how to close the app", *NOTHING),
]
SPANISH: list[Row] = [
    ("adiós", *CONFIRM),
    ("gracias, adiós", *CONFIRM),
    ("hasta luego", *CONFIRM),
    ("ya puede cerrar", *CLOSE),
    ("Gracias, puedes cerrar el chat", *CLOSE),
    ("gracias", *NOTHING),
    ("no puede cerrar", *NOTHING),
    ("tengo otra pregunta", *NOTHING),
    ("puede cerrar la cuenta?", *NOTHING),
]


@pytest.mark.parametrize(("text", "low", "high"), PORTUGUESE + ENGLISH + SPANISH)
def test_detect_closure(text: str, low: float, high: float) -> None:
    assert low <= detect_closure(text) <= high


@pytest.mark.parametrize("text", [None, "", "   ", "!!!", "👋"])
def test_no_words_means_no_closure(text: str | None) -> None:
    assert detect_closure(text) == 0.0


def test_question_lowers_confidence() -> None:
    assert detect_closure("pode fechar?") < detect_closure("pode fechar")
    assert detect_closure("tchau?") < detect_closure("tchau")


def test_signals_combine_but_thanks_alone_never_reaches_threshold() -> None:
    assert detect_closure("obrigado, tchau") > detect_closure("tchau") > detect_closure("obrigado")
    assert detect_closure("muito obrigado, valeu, agradeço") < THRESHOLD


def test_accents_and_case_do_not_matter() -> None:
    assert detect_closure("ADIÓS") == detect_closure("adios") == detect_closure("Adiós")
    assert detect_closure("ATÉ MAIS") == detect_closure("ate mais")


def test_phrase_detector_is_a_pluggable_closure_detector() -> None:
    detector: ClosureDetector = PhraseClosureDetector(farewells=("fui",))
    assert detector.confidence("fui!") >= THRESHOLD
    assert detector.confidence("tchau") == 0.0
    assert hash(detector) == hash(PhraseClosureDetector(farewells=("fui",)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sim", "affirmative"),
        ("Sim!", "affirmative"),
        ("pode", "affirmative"),
        ("pode sim", "affirmative"),
        ("claro", "affirmative"),
        ("ok", "affirmative"),
        ("Sim, obrigado pela ajuda", "affirmative"),
        ("muito obrigado", "affirmative"),
        ("yes", "affirmative"),
        ("yes please", "affirmative"),
        ("no problem", "affirmative"),
        ("sí, claro", "affirmative"),
        ("de acuerdo", "affirmative"),
        ("não, pode fechar", "affirmative"),
        ("não", "negative"),
        ("Não!", "negative"),
        ("no", "negative"),
        ("nope", "negative"),
        ("wait", "negative"),
        ("espera", "negative"),
        ("ainda não", "negative"),
        ("claro que não", "negative"),
        ("ok espera", "negative"),
        ("todavía no", "negative"),
        ("sim?", "other"),
        ("sim, mas antes uma dúvida", "other"),
        ("yes, one more question", "other"),
        ("pode me ajudar com o boleto", "other"),
        ("simples assim", "other"),
        ("nossa, que demora", "other"),
        ("okra", "other"),
        ("qual o horário de vocês", "other"),
        ("sim sim sim sim sim sim sim sim sim", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_classify_reply(text: str | None, expected: str) -> None:
    assert classify_reply(text) == expected


def test_ascii_text_takes_the_short_path_to_the_same_words() -> None:
    """_clauses skips NFKD and the combining-mark pass for ASCII: they change nothing but case."""
    import random
    import unicodedata

    from domain.closure_intent import _clauses

    def plain(text: str) -> str:
        folded = unicodedata.normalize("NFKD", text.casefold())
        return "".join(c for c in folded if not unicodedata.combining(c))

    rnd = random.Random(5)
    samples = [chr(c) for c in range(128)] + [
        "".join(rnd.choice([chr(c) for c in range(128)]) for _ in range(rnd.randint(1, 40)))
        for _ in range(2000)
    ]
    for text in samples:
        assert plain(text) == text.lower(), repr(text)
    assert _clauses("OK, Pode Fechar!") == (("ok",), ("pode", "fechar"))
    assert _clauses("Não, pode fechar") == (("nao",), ("pode", "fechar"))
