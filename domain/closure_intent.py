"""Closure intent: does a chat message say goodbye or ask to close? (Portuguese, English, Spanish)

How the default phrase detector scores a message:

- Text is case-folded, accents are stripped ("adiós" == "adios", "não" == "nao"), apostrophes
  dropped ("don't" == "dont") and the text is cut into clauses at punctuation. Phrases match
  whole words inside one clause; a trailing "*" marks a stem that also matches longer words
  ("tchau*" matches "tchauzinho", while "bye" never matches "bypass").
- Three signals: a close request ("pode fechar", 0.97), a farewell ("tchau", 0.80), thanks
  ("obrigado", 0.50). The strongest match of each signal is combined as a noisy-OR, so
  "obrigado, tchau" (0.90) outranks either alone yet still asks for confirmation, while
  "obrigado, pode fechar" (0.985) closes without asking. Thanks alone never reaches the
  default threshold (0.7): "Obrigado!" is how people keep talking, too.
- A close request or farewell right after a negation in the same clause does not count
  ("não pode fechar"), but "Não, pode fechar" (the usual answer to "anything else?") does.
  A close request about a business object ("pode fechar minha conta") is a request for the
  business, not for the chat, and does not count.
- A continuation ("outra pergunta", "one more question") multiplies the score by 0.2; a
  question mark by 0.75, so "pode fechar?" asks for confirmation instead of closing outright.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol

CLOSE_REQUEST_WEIGHT = 0.97
FAREWELL_WEIGHT = 0.80
THANKS_WEIGHT = 0.50
CONTINUATION_FACTOR = 0.2
QUESTION_FACTOR = 0.75
# A yes/no reply is short; a long message starting with "sim" is usually saying something else.
MAX_REPLY_WORDS = 8

CLOSE_REQUESTS: tuple[str, ...] = (
    # pt
    "pode fechar",
    "pode encerrar",
    "pode finalizar",
    "podem fechar",
    "podem encerrar",
    "pode dar por encerrado",
    "fecha o atendimento",
    "encerra o atendimento",
    "fechar o atendimento",
    "encerrar o atendimento",
    "finalizar o atendimento",
    "fecha o chamado",
    "encerra o chamado",
    "pode fechar o chamado",
    # en
    "you can close",
    "you may close",
    "can close this",
    "can close it",
    "please close",
    "feel free to close",
    "close the chat",
    "close this chat",
    "close the ticket",
    "close this ticket",
    "close the conversation",
    "close this conversation",
    # es
    "puede cerrar",
    "puedes cerrar",
    "pueden cerrar",
    "puede finalizar",
    "puedes finalizar",
    "cierra el chat",
    "cerrar el chat",
    "cierra la conversacion",
    "cerrar la conversacion",
    "puede terminar",
    "puedes terminar",
)
FAREWELLS: tuple[str, ...] = (
    # pt
    "tchau*",
    "xau*",
    "ate mais",
    "ate logo",
    "ate a proxima",
    "ate breve",
    "falou",
    "flw",
    "adeus",
    "tenha um bom dia",
    "tenha uma boa tarde",
    "tenha uma boa noite",
    # en
    "bye",
    "byebye",
    "goodbye",
    "good bye",
    "see you",
    "see ya",
    "have a nice day",
    "have a good day",
    "take care",
    # es
    "adios",
    "hasta luego",
    "hasta pronto",
    "hasta la proxima",
    "nos vemos",
    "chao",
    "chau",
    "que tenga buen dia",
    "que tengas buen dia",
)
THANKS: tuple[str, ...] = (
    "obrigad*",
    "brigad*",
    "valeu",
    "agradeco",
    "thanks",
    "thank you",
    "thx",
    "ty",
    "gracias",
    "muchas gracias",
)
CONTINUATIONS: tuple[str, ...] = (
    "outra pergunta",
    "mais uma pergunta",
    "outra duvida",
    "mais uma duvida",
    "mais uma coisa",
    "tenho uma duvida",
    "tenho uma pergunta",
    "posso perguntar",
    "another question",
    "one more question",
    "one more thing",
    "i have a question",
    "otra pregunta",
    "una pregunta mas",
    "otra duda",
    "una cosa mas",
    "tengo una pregunta",
    "tengo una duda",
)
AFFIRMATIVES: tuple[str, ...] = (
    "sim",
    "s",
    "pode",
    "pode sim",
    "claro",
    "ok",
    "okay",
    "okey",
    "oks",
    "certo",
    "isso",
    "isso mesmo",
    "beleza",
    "blz",
    "fechado",
    "confirmo",
    "exato",
    "perfeito",
    "por favor",
    "sem problema*",
    "obrigad*",
    "valeu",
    "yes",
    "y",
    "yep",
    "yeah",
    "yup",
    "sure",
    "confirm*",
    "of course",
    "please",
    "please do",
    "go ahead",
    "perfect",
    "no problem",
    "no worries",
    "thanks",
    "thank you",
    "si",
    "dale",
    "vale",
    "de acuerdo",
    "perfecto",
    "sin problema*",
    "gracias",
    "correcto",
)
NEGATIVES: tuple[str, ...] = (
    "nao",
    "n",
    "no",
    "nope",
    "nah",
    "not yet",
    "negativo",
    "espera",
    "espere",
    "pera",
    "perai",
    "aguarde",
    "aguarda",
    "calma",
    "ainda nao",
    "agora nao",
    "wait",
    "hold on",
    "dont",
    "cancel*",
    "todavia no",
    "un momento",
    "momento",
    "tampoco",
)
NEGATIONS = frozenset({"nao", "no", "not", "dont", "nunca", "never", "nem", "ni"})
# "pode fechar minha conta" asks the business to close an account, not the chat.
BUSINESS_OBJECTS = frozenset(
    {
        "conta",
        "cuenta",
        "account",
        "cartao",
        "card",
        "tarjeta",
        "pedido",
        "order",
        "compra",
        "boleto",
        "fatura",
        "factura",
        "invoice",
        "contrato",
        "contract",
    }
)
FILLERS = frozenset(
    {
        "entao",
        "pois",
        "tudo",
        "bem",
        "muito",
        "mesmo",
        "then",
        "so",
        "much",
        "very",
        "all",
        "good",
        "muchas",
        "todo",
        "bien",
    }
)
CONTRASTS = frozenset({"mas", "porem", "but", "however", "pero", "aunque"})

Reply = Literal["affirmative", "negative", "other"]
_Phrase = tuple[str, ...]
_Words = tuple[str, ...]
_Index = tuple[dict[str, tuple[_Phrase, ...]], tuple[_Phrase, ...], dict[str, tuple[_Phrase, ...]]]
_Match = tuple[_Words, int, int]


class ClosureDetector(Protocol):
    """Anything that scores how strongly a message means "we are done here" (0..1)."""

    def confidence(self, text: str) -> float:
        """Return the closure confidence of one message text, between 0 and 1."""
        ...


@dataclass(frozen=True, slots=True)
class PhraseClosureDetector:
    """Default detector: phrase tables per signal; frozen so policies stay hashable."""

    close_requests: tuple[str, ...] = CLOSE_REQUESTS
    farewells: tuple[str, ...] = FAREWELLS
    thanks: tuple[str, ...] = THANKS
    continuations: tuple[str, ...] = CONTINUATIONS

    def confidence(self, text: str) -> float:
        """Return the closure confidence of one message text, between 0 and 1."""
        clauses = _clauses(text)
        signalling = _signal_words(self.close_requests, self.farewells, self.thanks)
        if not any(signalling(word) for clause in clauses for word in clause):
            return 0.0  # no word can start a signal phrase: every signal is 0, so is the score
        return self.score(clauses, text)

    def score(self, clauses: tuple[_Words, ...], text: str) -> float:
        """The confidence of a text's clauses, every phrase table looked up."""
        signals = (
            CLOSE_REQUEST_WEIGHT if _close_request(clauses, self.close_requests) else 0.0,
            FAREWELL_WEIGHT if _hits(clauses, self.farewells, negatable=True) else 0.0,
            THANKS_WEIGHT if _hits(clauses, self.thanks, negatable=False) else 0.0,
        )
        miss = 1.0
        for weight in signals:
            miss *= 1.0 - weight
        score = 1.0 - miss
        if _hits(clauses, self.continuations, negatable=False):
            score *= CONTINUATION_FACTOR
        if "?" in text:
            score *= QUESTION_FACTOR
        return min(1.0, max(0.0, score))


DEFAULT_DETECTOR = PhraseClosureDetector()


def detect_closure(text: str | None) -> float:
    """Score a message with the default phrase detector (0 for no text)."""
    return DEFAULT_DETECTOR.confidence(text) if text else 0.0


def classify_reply(text: str | None) -> Reply:
    """Classify an answer to "may we close?" as affirmative, negative or other."""
    clauses = _clauses(text or "")
    if not clauses:
        return "other"
    if _close_request(clauses, CLOSE_REQUESTS):
        return "affirmative"
    first = clauses[0]
    if not _covered(first):
        return "negative" if _hits((first,), NEGATIVES, negatable=False) else "other"
    words = [w for clause in clauses for w in clause]
    if (
        "?" in (text or "")
        or len(words) > MAX_REPLY_WORDS
        or not CONTRASTS.isdisjoint(words)
        or _hits(clauses, CONTINUATIONS, negatable=False)
    ):
        return "other"
    return "affirmative"


def _covered(clause: _Words) -> bool:
    """Whether the clause is made only of affirmative phrases (and fillers), longest first."""
    index = _compiled(AFFIRMATIVES)
    i, matched = 0, False
    while i < len(clause):
        phrase = next((p for p in _candidates(index, clause[i]) if _match_at(clause, i, p)), None)
        if phrase is not None:
            i, matched = i + len(phrase), True
        elif clause[i] in FILLERS:
            i += 1
        else:
            return False
    return matched


@lru_cache(maxsize=256)
def _clauses(text: str) -> tuple[_Words, ...]:
    """Accent-, case- and apostrophe-free words, grouped into punctuation-delimited clauses."""
    if text.isascii():  # NFKD and case folding change nothing but the case: skip the per-character pass
        plain = text.lower()
    else:
        folded = unicodedata.normalize("NFKD", text.casefold())
        plain = "".join(c for c in folded if not unicodedata.combining(c))
    plain = plain.replace("'", "").replace("\u2019", "")
    parts = re.split(r"[.,;:!?\u00a1\u00bf\n]+", plain)
    return tuple(words for part in parts if (words := tuple(re.findall(r"\w+", part))))


@lru_cache(maxsize=32)
def _compiled(table: tuple[str, ...]) -> _Index:
    """Phrases indexed by their first word (stems apart), longest first, so lookups stay cheap."""
    phrases = sorted((tuple(p.split()) for p in table), key=len, reverse=True)
    by_first: dict[str, list[_Phrase]] = {}
    for phrase in phrases:
        if not phrase[0].endswith("*"):
            by_first.setdefault(phrase[0], []).append(phrase)
    stems = tuple(p for p in phrases if p[0].endswith("*"))
    return {word: tuple(group) for word, group in by_first.items()}, stems, {}


_CANDIDATES_PER_TABLE = 65_536  # words remembered per phrase table (cleared when full)


@lru_cache(maxsize=8)
def _signal_words(*tables: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a word can start a phrase of any of these tables (remembered per word): most
    messages have no such word, and their score is 0 without looking for phrases."""
    indexes = [_compiled(table) for table in tables]
    seen: dict[str, bool] = {}

    def signalling(word: str) -> bool:
        found = seen.get(word)
        if found is None:
            found = any(_candidates(index, word) for index in indexes)
            if len(seen) >= _CANDIDATES_PER_TABLE:
                seen.clear()
            seen[word] = found
        return found

    return signalling


def _candidates(index: _Index, word: str) -> tuple[_Phrase, ...]:
    by_first, stems, seen = index
    found = seen.get(word)
    if found is None:
        # every stem is tried against every word: remember the answer per word (the what-if
        # simulation scores millions of messages; chats reuse a small vocabulary)
        exact = by_first.get(word, ())
        stemmed = tuple(p for p in stems if word.startswith(p[0][:-1]))
        found = tuple(sorted(exact + stemmed, key=len, reverse=True)) if stemmed else exact
        if len(seen) >= _CANDIDATES_PER_TABLE:
            seen.clear()
        seen[word] = found
    return found


def _match_at(words: _Words, start: int, phrase: _Phrase) -> bool:
    if start + len(phrase) > len(words):
        return False
    for word, pattern in zip(words[start:], phrase, strict=False):
        ok = word.startswith(pattern[:-1]) if pattern.endswith("*") else word == pattern
        if not ok:
            return False
    return True


def _matches(clauses: tuple[_Words, ...], table: tuple[str, ...]) -> Iterator[_Match]:
    """Every (clause, start, end) where a phrase of the table matches."""
    index = _compiled(table)
    for clause in clauses:
        for start, word in enumerate(clause):
            for phrase in _candidates(index, word):
                if _match_at(clause, start, phrase):
                    yield clause, start, start + len(phrase)


def _hits(clauses: tuple[_Words, ...], table: tuple[str, ...], *, negatable: bool) -> bool:
    return any(
        not (negatable and start > 0 and clause[start - 1] in NEGATIONS)
        for clause, start, _ in _matches(clauses, table)
    )


def _close_request(clauses: tuple[_Words, ...], table: tuple[str, ...]) -> bool:
    for clause, start, end in _matches(clauses, table):
        negated = start > 0 and clause[start - 1] in NEGATIONS
        about_business = not BUSINESS_OBJECTS.isdisjoint(clause[end : end + 3])
        if not negated and not about_business:
            return True
    return False
