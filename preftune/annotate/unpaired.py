"""From labels to unpaired KTO rows: ``{prompt, completion, label, label_prob}``.

Every answer gives desirable / undesirable votes on candidates (``answers.thumbs``): a binary thumb,
a pairwise winner and loser, a ranking's best and worst, ratings above or below a threshold. For each
candidate of an item the majority of its votes is the label and the share of votes agreeing with it is
``label_prob``; evenly split candidates are dropped, and so are those with ``label_prob`` below
``min_agreement`` (contested items) or fewer than ``min_votes`` votes.
"""

from __future__ import annotations

import math
from collections import defaultdict

from preftune.errors import ConfigError

from .aggregate import label_records, labelled_items
from .answers import RATING_MAX, RATING_MIN, thumbs
from .images import export_images
from .importer import training_prompt, training_response
from .models import Project


def candidate_votes(kind: str, labels, threshold: float) -> dict[tuple[int, int], list[bool]]:
    """``{(item_id, candidate): [good, ...]}``, one vote per label that judges the candidate."""
    votes = defaultdict(list)
    for record in labels:
        for index, good in thumbs(kind, record.answer, threshold):
            votes[(record.item_id, index)].append(good)
    return votes


def export_kto(session, project: Project, min_agreement: float = 0.0, min_votes: int = 1,
               rating_threshold: float | None = None) -> list[dict]:
    """KTO rows for the project's labelled candidates (see the module docstring).

    ``rating_threshold`` (rating projects) defaults to the middle of the scale.
    """
    if not 0.0 <= min_agreement <= 1.0:  # also refuses NaN
        raise ConfigError(f"min_agreement must be from 0 to 1, got {min_agreement}")
    if rating_threshold is None:
        rating_threshold = (RATING_MIN + RATING_MAX) / 2
    elif not (math.isfinite(rating_threshold) and RATING_MIN <= rating_threshold <= RATING_MAX):
        raise ConfigError(f"rating_threshold must be from {RATING_MIN} to {RATING_MAX}, got {rating_threshold}")
    labels = label_records(session, project)
    items = labelled_items(session, project)
    rows = []
    for (item_id, index), votes in sorted(candidate_votes(project.kind, labels, rating_threshold).items()):
        good = sum(votes)
        bad = len(votes) - good
        if good == bad or len(votes) < min_votes:
            continue
        share = max(good, bad) / len(votes)
        if share < min_agreement:
            continue
        item = items[item_id]
        rows.append({"prompt": training_prompt(item), "completion": training_response(item, item.candidates[index]),
                     "label": good > bad,
                     "label_prob": round(share, 6), "annotators": len(votes), "item": item.external_id,
                     **export_images(item)})
    return rows
