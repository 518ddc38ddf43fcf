"""Adjudication: items whose labels disagree go to a queue that admins resolve.

An item is *disputed* when it has at least two labels and, for some pair of its candidates (binary: its
one candidate), the share of votes agreeing with the majority (a tie counting half each way) is below
the threshold (default 0.75: a 2-1 split is disputed, 3-0 is not). An admin's resolution is an answer
like a label's, stored in its own table (:class:`.models.Adjudication`) beside the labels, which stay
as they were; the competence model and the exports then take it as the item's known answer, as for a
gold item. Resolving an item again replaces the earlier resolution.
"""

from __future__ import annotations

import time
from collections import defaultdict

from sqlalchemy import select

from .aggregate import label_records, majority, votes_by_pair
from .answers import AnswerError, parse_answer, summary
from .models import Adjudication, Item, Project
from .queue import clean_note

DISPUTE_THRESHOLD = 0.75


def disputed_items(session, project: Project, threshold: float = DISPUTE_THRESHOLD, labels=None) -> list[dict]:
    """``[{item_id, external_id, agreement, labels, adjudicated}]``, least agreement first (gold items left out)."""
    labels = label_records(session, project) if labels is None else labels
    gold = set(session.scalars(select(Item.id).where(Item.project_id == project.id, Item.is_gold.is_(True))))
    count = defaultdict(int)
    for record in labels:
        count[record.item_id] += 1
    lowest: dict[int, float] = {}
    for (item_id, _, _), votes in votes_by_pair(project.kind, labels).items():
        if item_id in gold or count[item_id] < 2:
            continue
        share = majority(votes, "keep")[1]
        lowest[item_id] = min(share, lowest.get(item_id, 1.0))
    disputed = {item_id: share for item_id, share in lowest.items() if share < threshold}
    if not disputed:
        return []
    names = dict(session.execute(select(Item.id, Item.external_id).where(Item.id.in_(list(disputed)))).all())
    resolved = set(session.scalars(select(Adjudication.item_id).where(Adjudication.project_id == project.id)))
    return sorted(({"item_id": item_id, "external_id": names[item_id], "agreement": round(share, 4),
                    "labels": count[item_id], "adjudicated": item_id in resolved}
                   for item_id, share in disputed.items()), key=lambda d: (d["adjudicated"], d["agreement"]))


def item_labels(session, project: Project, item_id: int) -> list[dict]:
    """The item's labels as an adjudicator sees them: who, what (in canonical letters A, B, ...), the note."""
    rows = [r for r in label_records(session, project) if r.item_id == item_id]
    return [{"annotator": r.annotator, "answer": summary(project.kind, r.answer, list(range(len(r.display_order)))),
             "note": r.note} for r in rows]


def adjudicate(session, project: Project, item_id: int, annotator_id: int, fields, note) -> Adjudication:
    """Record (or replace) the resolution of an item: ``fields`` as a labelling form gives them, the
    candidates lettered in their canonical order."""
    item = session.get(Item, item_id)
    if item is None or item.project_id != project.id:
        raise LookupError(item_id)
    answer = parse_answer(project.kind, fields, list(range(len(item.candidates))))
    note = clean_note(project, note) if project.allow_notes else ""
    if not isinstance(note, str):
        raise AnswerError("note: expected text")
    found = session.scalar(select(Adjudication).where(Adjudication.item_id == item_id))
    if found is None:
        found = Adjudication(item_id=item_id, project_id=project.id, annotator_id=annotator_id, answer=answer,
                             note=note, created_at=time.time())
        session.add(found)
    else:
        found.answer, found.note, found.annotator_id, found.created_at = answer, note, annotator_id, time.time()
    session.flush()
    return found
