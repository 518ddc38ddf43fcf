"""Iterative DPO judged by people: a round's samples go to the annotation server, their labels come back as scores.

Round ``r`` gets its own project, ``<project>-round<r>``, holding one item per training prompt whose
candidates are the prompt's distinct, non-empty samples, asked as a ``rating`` (1-7 per candidate) or
``ranking`` question. Item ids are ``round<r>-prompt<i>``, so importing again (a resumed run) adds
nothing and labels already given stay; an item of that id with other texts (the project name reused by
another run) stops the run instead of pairing this run's prompts with another run's labels. Round
r > 1 takes the members of round r - 1's project (round 1's project starts with none: only admins see
it until members are added, and the run says so). The run waits until every item of the round is
complete (has the project's overlap of labels) or until ``annotate_timeout`` seconds after the import,
then reads the labels: a candidate's score is the number of other candidates it is expected to beat
under the competence-weighted posterior of every pair (:func:`preftune.annotate.competence.posterior`,
the function the annotation export's ``preference_prob`` comes from; competences estimated over the
round's labels). Prompts without a label are left out of the round (and counted).
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


def round_project(cfg, round_: int) -> str:
    return f"{cfg.project}-round{round_}"


def _open(cfg):
    from ..annotate.db import Database

    db = Database(cfg.annotate_db)
    db.upgrade()
    return db


def import_round(cfg, db, round_: int, prompts: list, samples: list[list[str]]) -> list[str]:
    """Add this round's items (once); returns their ids."""
    from ..annotate.importer import ItemSpec, ProjectError, add_items, ensure_project
    from ..annotate.members import add_member, list_members
    from ..annotate.models import Item
    from ..data.messages import plain_text
    from ..errors import ConfigError

    specs = []
    for index, (prompt, texts) in enumerate(zip(prompts, samples)):
        distinct = list(dict.fromkeys(t for t in texts if t.strip()))
        if len(distinct) >= 2:
            meta = {"prompt_messages": prompt} if isinstance(prompt, list) else {}
            specs.append(ItemSpec(item_id(round_, index), plain_text(prompt), distinct, {**meta, "round": round_}))
    name = round_project(cfg, round_)
    with db.write() as session:
        project, _ = ensure_project(session, name, cfg.annotate_kind, overlap=cfg.annotate_overlap)
        if project.kind != cfg.annotate_kind:
            raise ConfigError(f"project {name!r} asks {project.kind} questions; iterate needs "
                              f"{cfg.annotate_kind} (choose another --project or --annotate_kind)")
        existing = {row.external_id: row for row in session.execute(
            select(Item.external_id, Item.prompt, Item.candidates).where(
                Item.project_id == project.id, Item.external_id.in_([spec.external_id for spec in specs])))}
        for spec in specs:
            found = existing.get(spec.external_id)
            if found is not None and (found.prompt != spec.prompt or list(found.candidates) != spec.candidates):
                raise ConfigError(f"project {name!r} already holds an item {spec.external_id!r} with other texts: "
                                  "the project name was used by another run; choose a new --project")
        added, present = add_items(session, project, specs, seed=cfg.seed + round_)
        members = list_members(session, name)
        if not members and round_ > 1:
            try:
                for member in list_members(session, round_project(cfg, round_ - 1)):
                    add_member(session, name, member)
            except ProjectError:  # round r - 1 was judged elsewhere
                pass
            members = list_members(session, name)
    console.print(f"round {round_}: {added} items added to project {name!r} ({present} were there already)")
    if not members:
        console.print(f"[yellow]project {name!r} has no members: only admins can label it; add annotators with "
                      f"`preftune annotate member add {name} NAME`")
    return [spec.external_id for spec in specs]


def complete_count(db, project_name: str, ids: list[str]) -> int:
    from ..annotate.importer import get_project
    from ..annotate.models import Item

    with db.read() as session:
        project = get_project(session, project_name)
        return session.scalar(select(func.count()).select_from(Item).where(
            Item.project_id == project.id, Item.external_id.in_(ids), Item.complete.is_(True)))


def wait_for_labels(cfg, db, ids: list[str], deadline: float | None, sleep=time.sleep,
                    project: str | None = None) -> int:
    """Poll until every item is complete or the (wall-clock) deadline passes; returns the complete count."""
    last = -1
    project = project or cfg.project
    while True:
        done = complete_count(db, project, ids)
        if done != last:
            console.print(f"labels: {done} of {len(ids)} items complete in project {project!r}")
            last = done
        if done >= len(ids) or (deadline is not None and time.time() >= deadline):
            return done
        sleep(cfg.annotate_poll_seconds)


def read_labels(cfg, db, ids: list[str], project_name: str | None = None) -> dict[str, dict]:
    """``{item id: {"texts": candidates, "scores": expected candidates beaten, "labels": count}}`` of the
    labelled items (scores from the competence-weighted posterior of every pair, see the module docstring)."""
    from ..annotate.aggregate import label_records, project_competence
    from ..annotate.competence import candidate_scores
    from ..annotate.importer import get_project
    from ..annotate.models import Item

    wanted = set(ids)
    with db.read() as session:
        project = get_project(session, project_name or cfg.project)
        labels = label_records(session, project)
        model, votes, known = project_competence(session, project, labels)
        items = {item.id: item for item in session.scalars(select(Item).where(
            Item.project_id == project.id, Item.external_id.in_(list(wanted))))}
    count: dict[int, int] = {}
    for record in labels:
        count[record.item_id] = count.get(record.item_id, 0) + 1
    by_pair: dict[int, dict] = {}
    for (item, i, j), cast in votes.items():
        by_pair.setdefault(item, {})[(i, j)] = model.posterior([(name, outcome) for name, outcome, _ in cast],
                                                               known.get((item, i, j)))
    return {item.external_id: {"texts": list(item.candidates), "labels": count[item.id],
                               "scores": candidate_scores(len(item.candidates), by_pair.get(item.id, {}))}
            for item in items.values() if count.get(item.id)}


def judge_by_people(cfg, round_dir: Path, round_: int, prompts: list, samples: list[list[str]]) -> dict:
    """The judged round: ``{"texts", "scores", "stats"}`` from people's labels (see the module docstring)."""
    db = _open(cfg)
    try:
        marker = round_dir / "annotate_import.json"
        if marker.is_file():
            imported = json.loads(marker.read_text())
        else:
            imported = {"ids": import_round(cfg, db, round_, prompts, samples), "at": time.time(),
                        "project": round_project(cfg, round_)}
            marker.write_text(json.dumps(imported))
        name = imported.get("project", cfg.project)
        deadline = imported["at"] + cfg.annotate_timeout if cfg.annotate_timeout > 0 else None
        complete = wait_for_labels(cfg, db, imported["ids"], deadline, project=name)
        labelled = read_labels(cfg, db, imported["ids"], name)
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
