"""Inter-annotator agreement and per-annotator statistics.

Units of agreement: for pairwise and ranking questions each pair of candidates of an item (value:
which one won, or tie; nominal); for binary questions each item (thumbs up or down; nominal); for
ratings each candidate of an item (value: its 1-7 score; interval). With exactly two annotators the
headline is Cohen's kappa (quadratic weights for ratings), otherwise Krippendorff's alpha, which
allows any number of raters and missing values.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from itertools import combinations

from sqlalchemy import func, select

from .aggregate import LabelRecord, label_records, votes_by_pair
from .answers import comparisons
from .models import Annotator, Assignment, Project


def _distance(metric: str):
    if metric == "nominal":
        return lambda a, b: 0.0 if a == b else 1.0
    if metric == "interval":
        return lambda a, b: float(a - b) ** 2
    raise ValueError(f"unknown metric {metric!r}")


def cohen_kappa(a: list, b: list, weights: str | None = None) -> float | None:
    """Cohen's kappa of two raters' values over the same units; ``weights='quadratic'`` for ordered scores.

    None when undefined (no units, or both raters always give one and the same value).
    """
    if len(a) != len(b):
        raise ValueError("both raters need a value for every unit")
    if not a:
        return None
    if weights is None:
        weight = _distance("nominal")
    elif weights == "quadratic":
        weight = _distance("interval")
    else:
        raise ValueError(f"unknown weights {weights!r}")
    n = len(a)
    observed = sum(weight(x, y) for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[x] * count_b[y] * weight(x, y) for x in count_a for y in count_b) / (n * n)
    if expected == 0:
        return None
    return 1.0 - observed / expected


def krippendorff_alpha(units: list[list], metric: str = "nominal") -> float | None:
    """Krippendorff's alpha over units, each the list of values its raters gave (missing ones left out).

    Units with fewer than two values carry no information and are ignored. None when undefined.
    """
    distance = _distance(metric)
    coincidence: dict[tuple, float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c in counts:
            for k in counts:
                pairs = counts[c] * (counts[k] - (1 if c == k else 0))
                if pairs:
                    coincidence[(c, k)] += pairs / (m - 1)
    totals: dict = defaultdict(float)
    for (c, _), value in coincidence.items():
        totals[c] += value
    n = sum(totals.values())
    if n <= 1:
        return None
    observed = sum(value * distance(c, k) for (c, k), value in coincidence.items()) / n
    expected = sum(totals[c] * totals[k] * distance(c, k) for c in totals for k in totals) / (n * (n - 1))
    if expected == 0:
        return None
    return 1.0 - observed / expected


def agreement_units(kind: str, labels: list[LabelRecord]) -> tuple[dict, str]:
    """``{unit: {annotator: value}}`` and the metric for this question kind."""
    units: dict = defaultdict(dict)
    if kind == "rating":
        for record in labels:
            for index, score in enumerate(record.answer["scores"]):
                units[(record.item_id, index)][record.annotator] = score
        return units, "interval"
    for (item_id, i, j), votes in votes_by_pair(kind, labels).items():
        for annotator, outcome, _ in votes:
            units[(item_id, i, j)][annotator] = outcome
    return units, "nominal"


def project_agreement(session, project: Project, min_common: int = 2, labels: list[LabelRecord] | None = None) -> dict:
    """Agreement summary: raters, units, alpha, kappa (two raters) and kappa for every pair of raters.

    ``labels``: the project's label records when the caller has them already."""
    labels = label_records(session, project) if labels is None else labels
    units, metric = agreement_units(project.kind, labels)
    raters = sorted({name for values in units.values() for name in values})
    alpha = krippendorff_alpha([list(values.values()) for values in units.values()], metric)
    weights = "quadratic" if metric == "interval" else None
    pairs = []
    for a, b in combinations(raters, 2):
        common = [values for values in units.values() if a in values and b in values]
        if len(common) >= min_common:
            kappa = cohen_kappa([v[a] for v in common], [v[b] for v in common], weights)
            pairs.append({"a": a, "b": b, "common_units": len(common), "kappa": kappa})
    defined = [p["kappa"] for p in pairs if p["kappa"] is not None]
    shared = sum(1 for values in units.values() if len(values) >= 2)
    result = {"raters": len(raters), "units": len(units), "shared_units": shared, "metric": metric,
              "krippendorff_alpha": alpha, "cohen_kappa": None,
              "mean_pairwise_kappa": statistics.fmean(defined) if defined else None, "pairs": pairs}
    if len(raters) == 2:
        result["cohen_kappa"] = pairs[0]["kappa"] if pairs else None
        result["headline"] = {"name": "Cohen's kappa", "value": result["cohen_kappa"]}
    else:
        result["headline"] = {"name": "Krippendorff's alpha", "value": alpha}
    return result


def annotator_stats(session, project: Project, labels: list[LabelRecord] | None = None) -> list[dict]:
    """Per annotator: labels, skips, agreement with the others' majority, median seconds, position bias.

    ``first_shown_wins`` is the share of decided comparisons won by the response shown first
    (0.5 is unbiased); ``agreement_with_majority`` compares each vote with the majority of the other
    annotators of that pair (pairs where the others are split are left out).
    """
    labels = label_records(session, project) if labels is None else labels
    votes = votes_by_pair(project.kind, labels)
    agree, compared = Counter(), Counter()
    for pair_votes in votes.values():
        for annotator, outcome, _ in pair_votes:
            others = Counter(o for name, o, _ in pair_votes if name != annotator).most_common()
            if not others or (len(others) > 1 and others[0][1] == others[1][1]):
                continue
            compared[annotator] += 1
            agree[annotator] += others[0][0] == outcome
    first_wins, decided = Counter(), Counter()
    seconds = defaultdict(list)
    count = Counter()
    for record in labels:
        count[record.annotator] += 1
        seconds[record.annotator].append(record.seconds)
        position = {index: p for p, index in enumerate(record.display_order)}
        for i, j, outcome, _ in comparisons(project.kind, record.answer, len(record.display_order)):
            if outcome == 0:
                continue
            winner, loser = (i, j) if outcome > 0 else (j, i)
            decided[record.annotator] += 1
            first_wins[record.annotator] += position[winner] < position[loser]
    skips = dict(session.execute(
        select(Annotator.name, func.count()).join(Assignment, Assignment.annotator_id == Annotator.id)
        .where(Assignment.project_id == project.id, Assignment.status == "skipped").group_by(Annotator.name)).all())
    names = sorted(set(count) | set(skips))
    return [{"annotator": name, "labels": count[name], "skips": skips.get(name, 0),
             "agreement_with_majority": agree[name] / compared[name] if compared[name] else None,
             "compared": compared[name],
             "median_seconds": statistics.median(seconds[name]) if seconds[name] else None,
             "first_shown_wins": first_wins[name] / decided[name] if decided[name] else None,
             "decided": decided[name]} for name in names]
