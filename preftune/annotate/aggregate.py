"""From labels to training pairs: the competence-weighted posterior as ``preference_prob``.

Every answer is reduced to pairwise comparisons (rankings and ratings give one per pair of
candidates). Annotators' competences are estimated from all of the project's labels, anchored by gold
items and adjudications (:mod:`.competence`, one-coin Dawid-Skene), and each pair's votes give the
posterior probability that one response is better: the more probable side becomes chosen and that
probability its ``preference_prob``, so soft-label DPO learns less from contested pairs and a careless
(or adversarial) annotator's vote counts for what it is worth. An adjudicated or gold pair takes its
known answer (``preference_prob`` 1). ``weighting="votes"`` gives the plain majority and vote share
instead. Every row also carries ``vote_share``, the share of counted votes that agree with chosen.
Ties: ``drop`` ignores tie votes (and pairs with posterior exactly 0.5, or without a majority);
``keep`` counts a tie as half a vote each way in the vote share and keeps evenly split pairs with
``preference_prob`` 0.5.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from preftune.errors import ConfigError

from . import competence
from .answers import comparisons
from .images import export_images
from .importer import training_prompt, training_response
from .models import Adjudication, Annotator, Assignment, Item, Label, Project

TIE_MODES = ("drop", "keep")
WEIGHTINGS = ("competence", "votes")


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


def known_answers(session, project: Project) -> dict[int, dict]:
    """``{item_id: canonical answer}`` of the project's gold items and adjudicated items (an adjudication wins)."""
    found = dict(session.execute(select(Item.id, Item.gold).where(Item.project_id == project.id,
                                                                  Item.is_gold.is_(True))).all())
    found.update(session.execute(select(Adjudication.item_id, Adjudication.answer)
                                 .where(Adjudication.project_id == project.id)).all())
    return {item_id: answer for item_id, answer in found.items() if answer}


def _candidates_of(session, item_ids) -> dict[int, int]:
    return {item_id: len(candidates) for item_id, candidates in
            session.execute(select(Item.id, Item.candidates).where(Item.id.in_(list(item_ids)))).all()}


def known_units(session, project: Project) -> dict[tuple, int]:
    """The units (as in :func:`votes_by_pair`) whose answer is known: +1 / -1 (0: a known tie)."""
    answers = known_answers(session, project)
    sizes = _candidates_of(session, answers) if answers and project.kind != "binary" else {}
    units = {}
    for item_id, answer in answers.items():
        if project.kind == "binary":
            units[(item_id, 0, 0)] = 1 if answer["thumb"] == "up" else -1
            continue
        for i, j, outcome, _ in comparisons(project.kind, answer, sizes.get(item_id, 2)):
            units[(item_id, i, j)] = outcome
    return units


def project_competence(session, project: Project, labels: list[LabelRecord] | None = None):
    """(competence model, votes by unit, known units) of a project: :func:`competence.estimate` over every
    label, anchored by gold items and adjudications."""
    labels = label_records(session, project) if labels is None else labels
    votes = votes_by_pair(project.kind, labels)
    known = known_units(session, project)
    units = {unit: [(annotator, outcome) for annotator, outcome, _ in cast] for unit, cast in votes.items()}
    model = competence.estimate(units, known, estimate_prior=project.kind == "binary")
    return model, votes, known


def gold_results(session, project: Project, labels: list[LabelRecord]) -> dict[str, tuple[int, int]]:
    """``{annotator: (judgements matching the gold answer, judgements on gold items)}``: each comparison of a
    gold item counts (binary: the thumb); a tie where the gold answer has none counts as wrong."""
    gold = dict(session.execute(select(Item.id, Item.gold).where(Item.project_id == project.id,
                                                                 Item.is_gold.is_(True))).all())
    right, total = defaultdict(int), defaultdict(int)
    for record in labels:
        answer = gold.get(record.item_id)
        if not answer:
            continue
        if project.kind == "binary":
            right[record.annotator] += record.answer["thumb"] == answer["thumb"]
            total[record.annotator] += 1
            continue
        n = len(record.display_order)
        truth = {(i, j): outcome for i, j, outcome, _ in comparisons(project.kind, answer, n)}
        for i, j, outcome, _ in comparisons(project.kind, record.answer, n):
            right[record.annotator] += truth.get((i, j)) == outcome
            total[record.annotator] += 1
    return {name: (right[name], total[name]) for name in total}


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


def decide(votes: list[tuple[str, int, float]], ties: str, model, known: int | None = None,
           weighting: str = "competence") -> tuple[int, float, float, int] | None:
    """(side +1/-1, preference_prob, vote share agreeing with the side, votes counted) of one pair, or None
    when it is dropped. ``weighting="competence"``: the posterior of :func:`competence.posterior`."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    decided = majority(votes, ties)
    if weighting == "votes":
        return None if decided is None else (decided[0], decided[1], decided[1], decided[2])
    p = model.posterior([(annotator, outcome) for annotator, outcome, _ in votes], known)
    up = sum(1 for _, outcome, _ in votes if outcome > 0)
    down = sum(1 for _, outcome, _ in votes if outcome < 0)
    if ties == "keep":
        counted, share_first = len(votes), (up + 0.5 * (len(votes) - up - down)) / max(1, len(votes))
    else:
        counted, share_first = up + down, up / max(1, up + down)
    if (counted == 0 and known is None) or (p == 0.5 and ties == "drop"):
        return None
    side = 1 if p >= 0.5 else -1
    return side, (p if side > 0 else 1.0 - p), (share_first if side > 0 else 1.0 - share_first), counted


def export_pairs(session, project: Project, ties: str = "drop", min_votes: int = 1,
                 margin_scale: float = 0.0, weighting: str = "competence") -> list[dict]:
    """Rows ``{prompt, chosen, rejected, preference_prob, vote_share}`` (plus ``margin`` when ``margin_scale`` > 0).

    ``margin`` is ``margin_scale`` times the mean signed strength of the votes toward the chosen
    response (pairwise strength, rank distance or score difference; never below 0).
    """
    if not 0.0 <= margin_scale < float("inf"):  # also refuses NaN
        raise ConfigError(f"margin_scale must be a finite number of at least 0, got {margin_scale}")
    if project.kind == "binary":
        raise ConfigError(f"project {project.name!r} asks binary questions (no pairs): export it with --format kto")
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    labels = label_records(session, project)
    items = labelled_items(session, project)
    model, by_pair, known = project_competence(session, project, labels)
    rows = []
    for (item_id, i, j), votes in sorted(by_pair.items()):
        decided = decide(votes, ties, model, known.get((item_id, i, j)), weighting)
        if decided is None or decided[3] < min_votes:
            continue
        side, probability, share, counted = decided
        item = items[item_id]
        chosen, rejected = (i, j) if side > 0 else (j, i)
        row = {"prompt": training_prompt(item), "chosen": training_response(item, item.candidates[chosen]),
               "rejected": training_response(item, item.candidates[rejected]),
               "preference_prob": round(probability, 6), "vote_share": round(share, 6), "annotators": counted,
               "item": item.external_id, **export_images(item)}
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
    tmp.unlink(missing_ok=True)
    # labels are people's work and may hold their notes: readable by the owner only, whatever the umask
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(path)
    return path
