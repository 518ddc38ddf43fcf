"""Annotator competence and the competence-weighted posterior of each judgement (pure functions, no database).

Every kind of answer reduces to binary votes on *units*: a pair of candidates of an item (``+1``: the
first is better, ``-1``: the second; pairwise, ranking and rating answers, see ``answers.comparisons``)
or one candidate (binary thumbs: ``+1`` up, ``-1`` down). A tie vote says nothing about direction and
is left out.

The model is the one-coin Dawid-Skene model (Dawid & Skene 1979; the symmetric form MACE and most
crowdsourcing work use for binary questions): annotator ``k`` gives the true answer of a unit with
probability ``a_k`` (their *competence*), independently across units, and the opposite otherwise. EM
alternates the posterior of every unit's answer given the votes,

    logit P(y_u = +1 | votes) = logit(prior) + sum_k v_ku * logit(a_k)

with the competences that posterior implies, ``a_k = (expected agreements + alpha) / (votes + alpha +
beta)`` (a Beta(alpha, beta) prior: by default Beta(4, 1), a belief worth five votes that people try,
which also picks the right one of the model's two mirror-image solutions). Units with a *known* answer
(gold items, adjudicated items) keep it: they anchor the competences. Only *informative* votes estimate
a competence: votes on units that another annotator also judged, or whose answer is known (a unit
judged by one person says nothing about how often they are right). An annotator without such votes
keeps the prior mean, 0.8: with overlap 1 and no gold items every label weighs the same. An annotator
at 0.5 is at chance and their votes weigh nothing; one below 0.5 is informative the other way round
(their votes count inverted).

The prior of a unit's answer is 0.5 for comparisons (a pair has no natural direction: display orders
are randomised) and is estimated for binary thumbs (``estimate_prior=True``).

:func:`posterior` is the one function exports (``preference_prob``, KTO's ``label_prob``) and
``preftune iterate``'s human mode use to turn a unit's votes into a probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Iterable

ALPHA, BETA = 4.0, 1.0  # Beta prior of a competence: mean 0.8, worth five votes
Z90 = 1.6449  # two-sided 90% normal interval
CHANCE_BAND = 0.1  # "at chance": competence within this of 0.5 (and an interval that includes 0.5)
MIN_VOTES_TO_FLAG = 10

Vote = tuple[str, int]  # (annotator, +1 / -1 / 0)


@dataclass
class AnnotatorCompetence:
    annotator: str
    accuracy: float  # posterior mean of a_k
    sd: float  # posterior standard deviation (Beta)
    low: float  # 90% interval
    high: float
    votes: int  # informative directional votes it was estimated from
    flag: str | None  # None, "at chance" or "worse than chance"

    def as_dict(self) -> dict:
        return {"annotator": self.annotator, "competence": round(self.accuracy, 4), "sd": round(self.sd, 4),
                "low": round(self.low, 4), "high": round(self.high, 4), "votes": self.votes, "flag": self.flag}


@dataclass
class CompetenceModel:
    annotators: dict[str, AnnotatorCompetence]
    prior: float  # P(y = +1) of a unit without a known answer
    posteriors: dict[Hashable, float] = field(default_factory=dict)  # P(y_u = +1 | votes) per unit
    iterations: int = 0

    def accuracy(self, annotator: str) -> float:
        found = self.annotators.get(annotator)
        return found.accuracy if found is not None else ALPHA / (ALPHA + BETA)

    def posterior(self, votes: Iterable[Vote], known: int | None = None) -> float:
        return posterior(votes, {name: c.accuracy for name, c in self.annotators.items()}, self.prior, known)


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def posterior(votes: Iterable[Vote], accuracy: dict[str, float], prior: float = 0.5, known: int | None = None,
              default: float = ALPHA / (ALPHA + BETA)) -> float:
    """P(y = +1) of one unit given its votes and the annotators' competences (``default`` for one not in
    ``accuracy``); a known answer (``+1`` / ``-1``) gives 1 or 0, a known tie (``0``) 0.5."""
    if known is not None:
        return 0.5 if known == 0 else (1.0 if known > 0 else 0.0)
    score = _logit(prior)
    for annotator, outcome in votes:
        if outcome:
            score += (1 if outcome > 0 else -1) * _logit(accuracy.get(annotator, default))
    return _sigmoid(score)


def estimate(units: dict[Hashable, list[Vote]], known: dict[Hashable, int] | None = None, *,
             estimate_prior: bool = False, alpha: float = ALPHA, beta: float = BETA, iterations: int = 200,
             tolerance: float = 1e-7) -> CompetenceModel:
    """Fit the one-coin Dawid-Skene model by EM (see the module docstring).

    ``units``: the votes of every unit; ``known``: units whose answer is known (+1 / -1; 0, a known tie,
    anchors nothing). Starts from the vote shares, so that with mostly careful annotators it converges to
    the solution where they are above chance.
    """
    known = {u: k for u, k in (known or {}).items() if k}
    votes_of: dict[str, list[tuple[Hashable, int]]] = {}
    for unit, votes in units.items():
        directional = [(annotator, outcome) for annotator, outcome in votes if outcome]
        informative = unit in known or len({annotator for annotator, _ in directional}) >= 2
        for annotator, outcome in directional:
            cast = votes_of.setdefault(annotator, [])
            if informative:
                cast.append((unit, 1 if outcome > 0 else -1))
    # start: smoothed vote shares (known units fixed)
    q = {}
    for unit, votes in units.items():
        if unit in known:
            q[unit] = 1.0 if known[unit] > 0 else 0.0
            continue
        up = sum(1 for _, o in votes if o > 0)
        down = sum(1 for _, o in votes if o < 0)
        q[unit] = (up + 0.5) / (up + down + 1.0)
    for unit, answer in known.items():  # a gold unit nobody has labelled yet still has its answer
        q.setdefault(unit, 1.0 if answer > 0 else 0.0)
    prior = 0.5
    accuracy: dict[str, float] = {}
    done = 0
    for done in range(1, iterations + 1):
        accuracy = {}
        for annotator, cast in votes_of.items():
            agree = sum(q[u] if o > 0 else 1.0 - q[u] for u, o in cast)
            accuracy[annotator] = (agree + alpha) / (len(cast) + alpha + beta)
        if estimate_prior:
            free = [q[u] for u in units if u not in known]
            prior = (sum(free) + 1.0) / (len(free) + 2.0)
        change = 0.0
        for unit, votes in units.items():
            if unit in known:
                continue
            new = posterior(votes, accuracy, prior)
            change = max(change, abs(new - q[unit]))
            q[unit] = new
        if change < tolerance:
            break
    annotators = {}
    for annotator, cast in votes_of.items():
        agree = sum(q[u] if o > 0 else 1.0 - q[u] for u, o in cast)
        a, b = agree + alpha, len(cast) - agree + beta
        mean = a / (a + b)
        sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        low, high = max(0.0, mean - Z90 * sd), min(1.0, mean + Z90 * sd)
        annotators[annotator] = AnnotatorCompetence(annotator, mean, sd, low, high, len(cast),
                                                    flag_for(mean, low, high, len(cast)))
    return CompetenceModel(annotators, prior, q, done)


def flag_for(accuracy: float, low: float, high: float, votes: int) -> str | None:
    """"worse than chance" when even the interval's top is below 0.5; "at chance" when the estimate is
    within :data:`CHANCE_BAND` of 0.5 and the interval includes 0.5 (with at least :data:`MIN_VOTES_TO_FLAG`
    votes: a newcomer is not flagged on three labels)."""
    if votes < MIN_VOTES_TO_FLAG:
        return None
    if high < 0.5:
        return "worse than chance"
    if accuracy < 0.5 + CHANCE_BAND and low <= 0.5:
        return "at chance"
    return None


def candidate_scores(n: int, pair_probability: dict[tuple[int, int], float]) -> list[float]:
    """Each candidate's expected number of others it beats, from ``{(i, j): P(i better than j)}`` (i < j);
    a pair without a probability counts 0.5 each way."""
    scores = [0.0] * n
    for i in range(n):
        for j in range(i + 1, n):
            p = pair_probability.get((i, j), 0.5)
            scores[i] += p
            scores[j] += 1.0 - p
    return scores
