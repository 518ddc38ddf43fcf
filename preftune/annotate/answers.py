"""What an annotator's answer means, for each question kind.

Forms and API clients name candidates by the letter they were shown under (A, B, ...); answers are
stored in the canonical candidate order, with the displayed order kept beside them:

* pairwise: ``{"winner": index or None (tie), "strength": 1-3 or None}``
* ranking:  ``{"ranking": [indices, best first]}``
* rating:   ``{"scores": [1-7 per candidate]}``
* binary:   ``{"thumb": "up" or "down"}`` (one candidate: is it a good response?)

Every kind reduces to comparisons ``(i, j, outcome, magnitude)`` with ``i < j`` and outcome +1 (i better),
-1 (j better) or 0 (tie); aggregation, agreement and position bias all work on those. A binary answer
compares nothing: it is one vote on its single candidate (``thumbs``, which every kind also gives for
exports to unpaired KTO rows).
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STRENGTHS = {1: "slightly", 2: "clearly", 3: "much"}
RATING_MIN, RATING_MAX = 1, 7
MAX_CANDIDATES = len(LETTERS)
THUMBS = {"up": "up", "+": "up", "u": "up", "down": "down", "-": "down", "d": "down"}


class AnswerError(ValueError):
    """An answer that does not fit the question (shown to the annotator)."""


def _int(value, what: str, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise AnswerError(f"{what}: expected a whole number from {low} to {high}, got {value!r}") from None
    if not low <= number <= high:
        raise AnswerError(f"{what}: must be from {low} to {high}, got {number}")
    return number


def _position(letter, n: int, what: str) -> int:
    text = str(letter).strip().upper()
    if len(text) != 1 or text not in LETTERS[:n]:
        raise AnswerError(f"{what}: expected one of {', '.join(LETTERS[:n])}, got {letter!r}")
    return LETTERS.index(text)


def parse_answer(kind: str, fields: Mapping, display_order: list[int]) -> dict:
    """Form fields or a JSON object (in displayed positions) to the canonical answer."""
    n = len(display_order)
    if kind == "pairwise":
        choice = str(fields.get("choice") or "").strip()
        if not choice:
            raise AnswerError("choose A, B or tie")
        winner = None if choice.lower() == "tie" else display_order[_position(choice, n, "choice")]
        strength = fields.get("strength")
        strength = None if strength in (None, "") else _int(strength, "strength", 1, len(STRENGTHS))
        return {"winner": winner, "strength": strength}
    if kind == "ranking":
        if fields.get("ranking") not in (None, ""):
            order = fields["ranking"]
            if not isinstance(order, list):
                raise AnswerError("ranking: expected a list of letters, best first")
            positions = [_position(letter, n, "ranking") for letter in order]
        else:
            ranks = {LETTERS[p]: _int(fields.get(f"rank_{LETTERS[p]}"), f"rank of {LETTERS[p]}", 1, n)
                     for p in range(n)}
            positions = [LETTERS.index(letter) for letter, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
            if len(set(ranks.values())) != n:
                raise AnswerError(f"give each response a different rank from 1 to {n}")
        if sorted(positions) != list(range(n)):
            raise AnswerError(f"rank every response exactly once ({', '.join(LETTERS[:n])})")
        return {"ranking": [display_order[p] for p in positions]}
    if kind == "rating":
        if fields.get("scores") not in (None, ""):
            shown = fields["scores"]
            if not isinstance(shown, list) or len(shown) != n:
                raise AnswerError(f"scores: expected a list of {n} numbers in the order shown")
        else:
            shown = [fields.get(f"score_{LETTERS[p]}") for p in range(n)]
        scores = [0] * n
        for p, value in enumerate(shown):
            scores[display_order[p]] = _int(value, f"score of {LETTERS[p]}", RATING_MIN, RATING_MAX)
        return {"scores": scores}
    if kind == "binary":
        value = fields.get("thumb")
        if isinstance(value, bool):
            return {"thumb": "up" if value else "down"}
        if not isinstance(value, str) or value.strip().lower() not in THUMBS:
            raise AnswerError(f"thumb: choose up or down, got {value!r}")
        return {"thumb": THUMBS[value.strip().lower()]}
    raise AnswerError(f"unknown question kind {kind!r}")


def form_values(kind: str, answer: dict, display_order: list[int]) -> dict[str, str]:
    """The form fields (displayed positions) that reproduce a stored answer, to pre-fill an edit."""
    shown = {index: LETTERS[p] for p, index in enumerate(display_order)}
    if kind == "pairwise":
        values = {"choice": "tie" if answer["winner"] is None else shown[answer["winner"]]}
        if answer.get("strength"):
            values["strength"] = str(answer["strength"])
        return values
    if kind == "ranking":
        return {f"rank_{shown[index]}": str(rank) for rank, index in enumerate(answer["ranking"], start=1)}
    if kind == "binary":
        return {"thumb": answer["thumb"]}
    return {f"score_{shown[index]}": str(score) for index, score in enumerate(answer["scores"])}


def comparisons(kind: str, answer: dict, n: int) -> list[tuple[int, int, int, float]]:
    """The pairwise judgements an answer implies: ``(i, j, outcome, magnitude)`` with ``i < j``."""
    if kind == "pairwise":
        winner = answer["winner"]
        if winner is None:
            return [(0, 1, 0, 0.0)]
        return [(0, 1, 1 if winner == 0 else -1, float(answer.get("strength") or 1))]
    if kind == "ranking":
        rank = {index: r for r, index in enumerate(answer["ranking"])}
        return [(i, j, 1 if rank[i] < rank[j] else -1, float(abs(rank[i] - rank[j])))
                for i, j in combinations(range(n), 2)]
    if kind == "binary":
        return []
    scores = answer["scores"]
    out = []
    for i, j in combinations(range(n), 2):
        diff = scores[i] - scores[j]
        out.append((i, j, (diff > 0) - (diff < 0), float(abs(diff))))
    return out


def summary(kind: str, answer: dict, display_order: list[int]) -> str:
    """A short human reading of an answer, in the letters the annotator saw."""
    shown = {index: LETTERS[p] for p, index in enumerate(display_order)}
    if kind == "pairwise":
        if answer["winner"] is None:
            return "tie"
        loser = 1 - answer["winner"]
        strength = STRENGTHS.get(answer.get("strength") or 0)
        return f"{shown[answer['winner']]} > {shown[loser]}" + (f" ({strength})" if strength else "")
    if kind == "ranking":
        return " > ".join(shown[index] for index in answer["ranking"])
    if kind == "binary":
        return f"thumbs {answer['thumb']}"
    return ", ".join(f"{shown[index]}: {answer['scores'][index]}" for index in display_order)


def thumbs(kind: str, answer: dict, threshold: float) -> list[tuple[int, bool]]:
    """Desirable / undesirable votes ``(candidate, good)`` an answer gives, for unpaired (KTO) rows.

    binary: its thumb; pairwise: winner good, loser bad (a tie gives none); ranking: best good, worst
    bad; rating: a score above ``threshold`` good, below bad (equal: no vote).
    """
    if kind == "binary":
        return [(0, answer["thumb"] == "up")]
    if kind == "pairwise":
        winner = answer["winner"]
        return [] if winner is None else [(winner, True), (1 - winner, False)]
    if kind == "ranking":
        return [(answer["ranking"][0], True), (answer["ranking"][-1], False)]
    return [(index, score > threshold) for index, score in enumerate(answer["scores"]) if score != threshold]
