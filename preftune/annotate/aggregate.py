"""From labels to training pairs: majority preference, agreement as ``preference_prob``.

Every answer is reduced to pairwise comparisons (rankings and ratings give one per pair of
candidates). For each pair of an item the majority decides chosen / rejected, and the share of votes
that agree with it becomes ``preference_prob``, so soft-label DPO learns less from contested pairs.
Ties: ``drop`` ignores tie votes (and pairs without a majority); ``keep`` counts a tie as half a vote
each way and keeps evenly split pairs with ``preference_prob`` 0.5.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from preftune.errors import ConfigError

from .answers import comparisons
from .images import export_images
from .importer import training_prompt, training_response
from .models import Annotator, Assignment, Item, Label, Project

TIE_MODES = ("drop", "keep")


@dataclass
class LabelRecord:
    item_id: int
    annotator: str
    answer: dict
    display_order: list[int]
    seconds: float
    note: str
    created_at: float


def label_records(session, project: Project) -> list[LabelRecord]:
    """Every stored label of the project (skips are not labels); items are not loaded."""
    rows = session.execute(
        select(Label.item_id, Annotator.name, Label.answer, Assignment.display_order, Label.seconds, Label.note,
               Label.created_at)
        .join(Annotator, Annotator.id == Label.annotator_id)
        .join(Assignment, Assignment.id == Label.assignment_id)
        .where(Label.project_id == project.id).order_by(Label.item_id, Label.id))
    return [LabelRecord(*row) for row in rows]


def labelled_items(session, project: Project) -> dict[int, Item]:
    """The project's items that have at least one label, by id (exports need their texts)."""
    labelled = select(Label.item_id).where(Label.project_id == project.id)
    return {item.id: item for item in session.scalars(select(Item).where(Item.id.in_(labelled)))}


def votes_by_pair(kind: str, labels: list[LabelRecord]) -> dict:
    """``{(item_id, i, j): [(annotator, outcome, magnitude), ...]}`` over all labels.

    A binary answer is a vote on its one candidate: key ``(item_id, 0, 0)``, outcome +1 up, -1 down.
    """
    votes = defaultdict(list)
    for record in labels:
        if kind == "binary":
            votes[(record.item_id, 0, 0)].append((record.annotator, 1 if record.answer["thumb"] == "up" else -1, 1.0))
            continue
        n = len(record.display_order)  # one entry per candidate
        for i, j, outcome, magnitude in comparisons(kind, record.answer, n):
            votes[(record.item_id, i, j)].append((record.annotator, outcome, magnitude))
    return votes


def majority(votes: list[tuple[str, int, float]], ties: str = "drop") -> tuple[int, float, int] | None:
    """(winner side +1/-1, share of votes agreeing, votes counted); None when the pair is dropped.

    With ``ties='keep'`` an evenly split pair gives side +1 with share 0.5.
    """
    if ties not in TIE_MODES:
        raise ConfigError(f"ties must be one of {', '.join(TIE_MODES)}, got {ties!r}")
    first = sum(1 for _, outcome, _ in votes if outcome > 0)
    second = sum(1 for _, outcome, _ in votes if outcome < 0)
    tied = len(votes) - first - second
    if ties == "drop":
        counted = first + second
        if counted == 0 or first == second:
            return None
        return (1, first / counted, counted) if first > second else (-1, second / counted, counted)
    counted = len(votes)
    share_first = (first + 0.5 * tied) / counted
    return (1, share_first, counted) if share_first >= 0.5 else (-1, 1.0 - share_first, counted)


def export_pairs(session, project: Project, ties: str = "drop", min_votes: int = 1,
                 margin_scale: float = 0.0) -> list[dict]:
    """Rows ``{prompt, chosen, rejected, preference_prob}`` (plus ``margin`` when ``margin_scale`` > 0).

    ``margin`` is ``margin_scale`` times the mean signed strength of the votes toward the chosen
    response (pairwise strength, rank distance or score difference; never below 0).
    """
    if not 0.0 <= margin_scale < float("inf"):  # also refuses NaN
        raise ConfigError(f"margin_scale must be a finite number of at least 0, got {margin_scale}")
    if project.kind == "binary":
        raise ConfigError(f"project {project.name!r} asks binary questions (no pairs): export it with --format kto")
    labels = label_records(session, project)
    items = labelled_items(session, project)
    rows = []
    for (item_id, i, j), votes in sorted(votes_by_pair(project.kind, labels).items()):
        decided = majority(votes, ties)
        if decided is None or decided[2] < min_votes:
            continue
        side, share, counted = decided
        item = items[item_id]
        chosen, rejected = (i, j) if side > 0 else (j, i)
        row = {"prompt": training_prompt(item), "chosen": training_response(item, item.candidates[chosen]),
               "rejected": training_response(item, item.candidates[rejected]),
               "preference_prob": round(share, 6), "annotators": counted, "item": item.external_id,
               **export_images(item)}
        if margin_scale > 0:
            signed = [magnitude * outcome * side for _, outcome, magnitude in votes]
            row["margin"] = round(max(0.0, margin_scale * sum(signed) / len(signed)), 6)
        rows.append(row)
    return rows


def export_raw(session, project: Project) -> list[dict]:
    """Every label as stored: the answer (canonical order), the order shown, note, time taken."""
    labels = label_records(session, project)
    items = labelled_items(session, project)
    return [{"item": items[r.item_id].external_id, "prompt": items[r.item_id].prompt,
             "candidates": items[r.item_id].candidates, "kind": project.kind, "annotator": r.annotator,
             "answer": r.answer, "display_order": r.display_order, "note": r.note,
             "seconds": round(r.seconds, 3), "created_at": r.created_at, **export_images(items[r.item_id])}
            for r in labels]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)
    return path
