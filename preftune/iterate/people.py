"""Iterative DPO judged by people: a round's samples go to the annotation server, their labels come back as scores.

Each training prompt becomes one item of the project (``--project``) whose candidates are the
prompt's distinct, non-empty samples, asked as a ``rating`` (1-7 per candidate) or ``ranking``
question. Item ids are ``round<r>-prompt<i>``, so importing again (a resumed run) adds nothing and
labels already given stay. The run waits until every item of the round is complete (has the
project's overlap of labels) or until ``annotate_timeout`` seconds after the import, then reads the
labels: a candidate's score is its mean rating, or for rankings its mean number of candidates ranked
below it. Prompts without a label are left out of the round (and counted).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from sqlalchemy import func, select

console = Console(stderr=True)


def item_id(round_: int, index: int) -> str:
    return f"round{round_}-prompt{index}"


def _open(cfg):
    from ..annotate.db import Database

    db = Database(cfg.annotate_db)
    db.upgrade()
    return db


def import_round(cfg, db, round_: int, prompts: list, samples: list[list[str]]) -> list[str]:
    """Add this round's items (once); returns their ids."""
    from ..annotate.importer import ItemSpec, add_items, ensure_project
    from ..data.messages import plain_text

    specs = []
    for index, (prompt, texts) in enumerate(zip(prompts, samples)):
        distinct = list(dict.fromkeys(t for t in texts if t.strip()))
        if len(distinct) >= 2:
            meta = {"prompt_messages": prompt} if isinstance(prompt, list) else {}
            specs.append(ItemSpec(item_id(round_, index), plain_text(prompt), distinct, {**meta, "round": round_}))
    with db.write() as session:
        project, _ = ensure_project(session, cfg.project, cfg.annotate_kind, overlap=cfg.annotate_overlap)
        if project.kind != cfg.annotate_kind:
            from ..errors import ConfigError

            raise ConfigError(f"project {cfg.project!r} asks {project.kind} questions; iterate needs "
                              f"{cfg.annotate_kind} (choose another --project or --annotate_kind)")
        added, present = add_items(session, project, specs, seed=cfg.seed + round_)
    console.print(f"round {round_}: {added} items added to project {cfg.project!r} ({present} were there already)")
    return [spec.external_id for spec in specs]


def complete_count(db, project_name: str, ids: list[str]) -> int:
    from ..annotate.importer import get_project
    from ..annotate.models import Item

    with db.read() as session:
        project = get_project(session, project_name)
        return session.scalar(select(func.count()).select_from(Item).where(
            Item.project_id == project.id, Item.external_id.in_(ids), Item.complete.is_(True)))


def wait_for_labels(cfg, db, ids: list[str], deadline: float | None, sleep=time.sleep) -> int:
    """Poll until every item is complete or the (wall-clock) deadline passes; returns the complete count."""
    last = -1
    while True:
        done = complete_count(db, cfg.project, ids)
        if done != last:
            console.print(f"labels: {done} of {len(ids)} items complete in project {cfg.project!r}")
            last = done
        if done >= len(ids) or (deadline is not None and time.time() >= deadline):
            return done
        sleep(cfg.annotate_poll_seconds)


def candidate_scores(kind: str, answers: list[dict], n: int) -> list[float]:
    """Mean per-candidate score over an item's answers (rating: the 1-7 score; ranking: candidates beaten)."""
    totals = [0.0] * n
    for answer in answers:
        if kind == "rating":
            values = answer["scores"]
        else:
            position = {index: rank for rank, index in enumerate(answer["ranking"])}
            values = [n - 1 - position[i] for i in range(n)]
        totals = [t + v for t, v in zip(totals, values)]
    return [t / len(answers) for t in totals]


def read_labels(cfg, db, ids: list[str]) -> dict[str, dict]:
    """``{item id: {"texts": candidates, "scores": mean scores, "labels": count}}`` of the labelled items."""
    from ..annotate.aggregate import export_raw
    from ..annotate.importer import get_project

    wanted = set(ids)
    with db.read() as session:
        project = get_project(session, cfg.project)
        rows = [row for row in export_raw(session, project) if row["item"] in wanted]
    by_item: dict[str, list[dict]] = {}
    for row in rows:
        by_item.setdefault(row["item"], []).append(row)
    return {key: {"texts": labels[0]["candidates"], "labels": len(labels),
                  "scores": candidate_scores(labels[0]["kind"], [r["answer"] for r in labels],
                                             len(labels[0]["candidates"]))}
            for key, labels in by_item.items()}


def judge_by_people(cfg, round_dir: Path, round_: int, prompts: list, samples: list[list[str]]) -> dict:
    """The judged round: ``{"texts", "scores", "stats"}`` from people's labels (see the module docstring)."""
    db = _open(cfg)
    try:
        marker = round_dir / "annotate_import.json"
        if marker.is_file():
            imported = json.loads(marker.read_text())
        else:
            imported = {"ids": import_round(cfg, db, round_, prompts, samples), "at": time.time()}
            marker.write_text(json.dumps(imported))
        deadline = imported["at"] + cfg.annotate_timeout if cfg.annotate_timeout > 0 else None
        complete = wait_for_labels(cfg, db, imported["ids"], deadline)
        labelled = read_labels(cfg, db, imported["ids"])
    finally:
        db.dispose()
    texts, scores = [], []
    for index in range(len(prompts)):
        found = labelled.get(item_id(round_, index))
        texts.append(found["texts"] if found else [])
        scores.append(found["scores"] if found else [])
    stats = {"items": len(imported["ids"]), "items_complete": complete, "items_labelled": len(labelled),
             "prompts_unlabelled": len(prompts) - len(labelled)}
    return {"texts": texts, "scores": scores, "stats": stats}
