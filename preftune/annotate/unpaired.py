"""From labels to unpaired KTO rows: ``{prompt, completion, label, label_prob}``.

Every answer gives desirable / undesirable votes on candidates (``answers.thumbs``): a binary thumb,
a pairwise winner and loser, a ranking's best and worst, ratings above or below a threshold. For each
candidate of an item the competence-weighted posterior of its votes (:func:`.competence.posterior`, the
annotators' competences estimated from all of the project's labels, see :func:`.aggregate.project_competence`)
decides the label, and its probability is ``label_prob``; a gold or adjudicated item gives its known
answer. ``weight`` = 2 * label_prob - 1 is the example's weight in ``preftune kto``: with equal
desirable and undesirable weights, the expected KTO gradient under the posterior is exactly the hard
label's gradient times this weight, so a coin-flip label teaches nothing. ``vote_share`` is the plain
share of agreeing votes. Candidates whose posterior is exactly 0.5 are dropped, and so are those with
``label_prob`` below ``min_agreement`` (contested items) or fewer than ``min_votes`` votes.
``weighting="votes"``: the plain majority and vote share instead (``weight`` then 2 * share - 1).
"""

from __future__ import annotations

import math
from collections import defaultdict

from preftune.errors import ConfigError

from .aggregate import WEIGHTINGS, known_answers, label_records, labelled_items, project_competence
from .answers import RATING_MAX, RATING_MIN, thumbs
from .competence import posterior
from .images import export_images
from .importer import training_prompt, training_response
from .models import Project


def candidate_votes(kind: str, labels, threshold: float) -> dict[tuple[int, int], list[tuple[str, bool]]]:
    """``{(item_id, candidate): [(annotator, good), ...]}``, one vote per label that judges the candidate."""
    votes = defaultdict(list)
    for record in labels:
        for index, good in thumbs(kind, record.answer, threshold):
            votes[(record.item_id, index)].append((record.annotator, good))
    return votes


def export_kto(session, project: Project, min_agreement: float = 0.0, min_votes: int = 1,
               rating_threshold: float | None = None, weighting: str = "competence") -> list[dict]:
    """KTO rows for the project's labelled candidates (see the module docstring).

    ``rating_threshold`` (rating projects) defaults to the middle of the scale.
    """
    if not 0.0 <= min_agreement <= 1.0:  # also refuses NaN
        raise ConfigError(f"min_agreement must be from 0 to 1, got {min_agreement}")
    if rating_threshold is None:
        rating_threshold = (RATING_MIN + RATING_MAX) / 2
    elif not (math.isfinite(rating_threshold) and RATING_MIN <= rating_threshold <= RATING_MAX):
        raise ConfigError(f"rating_threshold must be from {RATING_MIN} to {RATING_MAX}, got {rating_threshold}")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    labels = label_records(session, project)
    items = labelled_items(session, project)
    model = project_competence(session, project, labels)[0]
    accuracy = {name: c.accuracy for name, c in model.annotators.items()}
    known = {(item_id, index): good for item_id, answer in known_answers(session, project).items()
             for index, good in thumbs(project.kind, answer, rating_threshold)}
    rows = []
    for (item_id, index), votes in sorted(candidate_votes(project.kind, labels, rating_threshold).items()):
        good = sum(1 for _, vote in votes if vote)
        bad = len(votes) - good
        if len(votes) < min_votes:
            continue
        if weighting == "votes":
            if good == bad:
                continue
            p_good = good / len(votes)
        else:
            answer = known.get((item_id, index))
            p_good = posterior([(name, 1 if vote else -1) for name, vote in votes], accuracy, model.prior,
                               None if answer is None else (1 if answer else -1))
            if p_good == 0.5:
                continue
        desirable = p_good > 0.5
        probability = p_good if desirable else 1.0 - p_good
        if probability < min_agreement:
            continue
        item = items[item_id]
        rows.append({"prompt": training_prompt(item), "completion": training_response(item, item.candidates[index]),
                     "label": desirable, "label_prob": round(probability, 6),
                     "weight": round(2 * probability - 1, 6),
                     "vote_share": round((good if desirable else bad) / len(votes), 6),
                     "annotators": len(votes), "item": item.external_id, **export_images(item)})
    return rows
