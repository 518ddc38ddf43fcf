"""Storage, assignment, ordering and export against each database (SQLite and PostgreSQL)."""

import json
import os
import time
from collections import Counter

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text

from preftune.annotate import queue
from preftune.annotate.aggregate import export_pairs
from preftune.annotate.agreement import annotator_stats, krippendorff_alpha, project_agreement
from preftune.annotate.db import Database, alembic_config
from preftune.annotate.importer import get_project
from preftune.annotate.models import Annotator, Assignment, Base, Item, Label
from preftune.annotate.ordering import RewardModelWatcher, rerank_project


def ids(db, names):
    with db.read() as session:
        return {a.name: a.id for a in session.scalars(select(Annotator).where(Annotator.name.in_(names)))}


def project(db, name="demo"):
    with db.read() as session:
        return get_project(session, name)


def label_all(db, proj, annotator_id, choose=lambda item, order: {"choice": "A"}):
    """Label everything the annotator is served; returns the item ids in serving order."""
    served_ids = []
    while (served := queue.next_item(db, proj, annotator_id)) is not None:
        fields = choose(served.item, served.assignment.display_order)
        queue.submit(db, proj, annotator_id, served.item.id, fields, "", f"r-{annotator_id}-{served.item.id}")
        served_ids.append(served.item.id)
    return served_ids


def test_upgrade_from_the_first_schema_keeps_every_row_and_matches_the_models(db_url):
    database = Database(db_url)
    with database.engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0001")
    with database.write() as session:
        session.execute(text("INSERT INTO projects (id, name, kind, guidelines, overlap, allow_notes, created_at) "
                             "VALUES (1, 'old', 'pairwise', '', 1, true, 0)"))
        session.execute(text("INSERT INTO items (id, project_id, external_id, prompt, candidates, meta, random_key, "
                             "created_at) VALUES (1, 1, 'x', 'p', '[\"a\", \"b\"]', '{}', 0.5, 0)"))
        session.execute(text("INSERT INTO annotators VALUES (1, 'ann', 'h', false, true, 0)"))
        session.execute(text("INSERT INTO assignments VALUES (1, 1, 1, 1, '[1, 0]', 'done', 0)"))
        session.execute(text("INSERT INTO labels VALUES (1, 1, 1, 1, 1, '{\"winner\": 0, \"strength\": null}', "
                             "'a note', 'req', 3.0, 1, 1)"))
    assert database.upgrade() == "0001"
    with database.read() as session:
        label = session.scalar(select(Label))
        item = session.scalar(select(Item))
        assert (label.note, label.answer, item.candidates) == ("a note", {"winner": 0, "strength": None}, ["a", "b"])
        assert (item.priority, item.complete) == (0.0, True)  # new columns filled from the rows already there
    with database.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    if database.is_sqlite:  # the file was copied aside before the upgrade
        assert os.path.exists(database.engine.url.database + ".before-0001")
    database.dispose()


def test_each_item_goes_to_overlap_annotators_in_a_recorded_random_order(db, make_project):
    make_project(db, items=30, overlap=2, annotators=("a", "b", "c"), admins=())
    proj, people = project(db), ids(db, ["a", "b", "c"])
    served = {name: label_all(db, proj, people[name]) for name in ("a", "b", "c")}
    per_item = Counter(i for items in served.values() for i in items)
    assert set(per_item.values()) == {2} and len(per_item) == 30
    assert len(served["a"]) == 30 and len(served["c"]) == 0  # a and b filled every item first
    with db.read() as session:
        orders = [tuple(a.display_order) for a in session.scalars(select(Assignment))]
        labels = session.scalars(select(Label)).all()
    assert Counter(orders)[(0, 1)] > 5 and Counter(orders)[(1, 0)] > 5  # both orders are used
    with db.read() as session:  # "A" means whatever was shown first: stored canonically
        for label in labels:
            order = session.scalar(select(Assignment.display_order).where(Assignment.id == label.assignment_id))
            assert label.answer["winner"] == order[0]


def test_retries_are_idempotent_and_labels_unique(db, make_project):
    make_project(db, items=3, annotators=("a",), admins=())
    proj, me = project(db), ids(db, ["a"])["a"]
    served = queue.next_item(db, proj, me)
    assert queue.next_item(db, proj, me).item.id == served.item.id  # asking again: the same open item
    first = queue.submit(db, proj, me, served.item.id, {"choice": "B"}, "n", "req-1")
    again = queue.submit(db, proj, me, served.item.id, {"choice": "B"}, "n", "req-1")
    assert (first.outcome, again.outcome, again.label.id) == ("created", "duplicate", first.label.id)
    edited = queue.submit(db, proj, me, served.item.id, {"choice": "tie"}, "changed", "req-2")
    assert edited.outcome == "updated"
    other = queue.next_item(db, proj, me)
    with pytest.raises(queue.RequestConflict):
        queue.submit(db, proj, me, other.item.id, {"choice": "A"}, "", "req-1")
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Label)) == 1
        assert session.scalar(select(Label.answer)) == {"winner": None, "strength": None}


def test_skipped_items_go_to_someone_else(db, make_project):
    make_project(db, items=2, overlap=1, annotators=("a", "b"), admins=())
    proj, people = project(db), ids(db, ["a", "b"])
    first = queue.next_item(db, proj, people["a"])
    queue.skip(db, proj, people["a"], first.item.id)
    assert label_all(db, proj, people["a"]) == [i for i in (1, 2) if i != first.item.id]
    assert label_all(db, proj, people["b"]) == [first.item.id]
    with pytest.raises(queue.NotAssigned):  # b was never served a's other item
        queue.submit(db, proj, people["b"], 3 - first.item.id, {"choice": "A"}, "", "x")


def test_an_abandoned_item_is_freed_after_its_lease(db, make_project):
    make_project(db, items=1, overlap=1, annotators=("a", "b"), admins=())
    proj, people = project(db), ids(db, ["a", "b"])
    assert queue.next_item(db, proj, people["a"]) is not None
    assert queue.next_item(db, proj, people["b"]) is None
    assert queue.next_item(db, proj, people["b"], lease=0.0) is not None


def test_export_and_agreement_from_stored_labels(db, make_project):
    make_project(db, items=4, overlap=3, annotators=("a", "b", "c"), admins=())
    proj, people = project(db), ids(db, ["a", "b", "c"])
    # candidate 0 wins for a and b; c prefers candidate 1 on item-0 and says tie on item-1
    def choose_for(name):
        def choose(item, order):
            if name == "c" and item.external_id == "item-0":
                return {"choice": "AB"[order.index(1)]}
            if name == "c" and item.external_id == "item-1":
                return {"choice": "tie"}
            return {"choice": "AB"[order.index(0)]}
        return choose
    for name in ("a", "b", "c"):
        label_all(db, proj, people[name], choose_for(name))
    with db.read() as session:
        rows = {r["item"]: r for r in export_pairs(session, proj, weighting="votes")}
        kept = {r["item"]: r for r in export_pairs(session, proj, ties="keep", weighting="votes")}
        agreement = project_agreement(session, proj)
        stats = {s["annotator"]: s for s in annotator_stats(session, proj)}
    assert rows["item-0"]["chosen"] == "response 0.0" and rows["item-0"]["preference_prob"] == pytest.approx(2 / 3)
    assert rows["item-1"]["preference_prob"] == 1.0 and rows["item-1"]["annotators"] == 2
    assert kept["item-1"]["preference_prob"] == pytest.approx(2.5 / 3)
    assert rows["item-2"]["preference_prob"] == 1.0
    assert agreement["raters"] == 3 and agreement["headline"]["name"] == "Krippendorff's alpha"
    expected = krippendorff_alpha([[1, 1, -1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])  # one unit per item
    assert agreement["krippendorff_alpha"] == pytest.approx(expected) and expected < 0.2
    assert stats["a"]["agreement_with_majority"] == 1.0 and stats["c"]["agreement_with_majority"] == 0.5
    assert stats["a"]["first_shown_wins"] is not None and stats["a"]["median_seconds"] >= 0


def test_active_learning_serves_the_least_separated_items_first_and_reranks(db, make_project, tmp_path):
    make_project(db, items=6, annotators=("a",), admins=())
    proj, me = project(db), ids(db, ["a"])["a"]

    def scorer_from(gaps):
        def scorer(prompts, responses):  # "Prompt i": candidate 0 scores 0, candidate 1 scores gaps[i]
            return [0.0 if r.endswith(".0") else gaps[int(p.split()[-1])] for p, r in zip(prompts, responses)]
        return scorer

    rerank_project(db, "demo", scorer_from([5, 0.1, 3, -0.2, 9, 1]))
    with db.read() as session:
        order = [i.external_id for i in session.scalars(select(Item).order_by(Item.priority))]
    assert order == ["item-1", "item-3", "item-5", "item-2", "item-0", "item-4"]
    assert queue.next_item(db, proj, me).item.external_id == "item-1"

    model = tmp_path / "reward-model"
    model.mkdir()
    (model / "weights").write_text("v1")
    loads = []

    def load(path):
        loads.append(path)
        return scorer_from([0, 5, 5, 5, 5, 5] if len(loads) > 1 else [5, 0.1, 3, -0.2, 9, 1])

    watcher = RewardModelWatcher(db, str(model), load_scorer=load, interval=0.05)
    assert watcher.check_once() and not watcher.check_once()  # unchanged model: no re-rank
    (model / "weights").write_text("v2")
    os.utime(model / "weights", (time.time() + 5, time.time() + 5))
    watcher.start()
    deadline = time.monotonic() + 10
    while len(loads) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.stop()
    assert len(loads) == 2
    with db.read() as session:
        assert session.scalar(select(Item.external_id).order_by(Item.priority).limit(1)) == "item-0"


def test_reward_model_scorer_ranks_with_a_real_reward_model(tmp_path, tiny_model_dir, make_project):
    pytest.importorskip("preftune.recipes.reward")
    from preftune.annotate.ordering import reward_model_scorer
    from preftune.scoring.reward_model import load_classifier, load_reward_model, score_texts

    model_dir = tmp_path / "rm"
    load_classifier(str(tiny_model_dir), new_head=True).save_pretrained(model_dir)
    for name in os.listdir(tiny_model_dir):
        if "token" in name or name.endswith(".jinja"):
            (model_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    database = Database(str(tmp_path / "a.db"))
    database.upgrade()
    make_project(database, items=5, annotators=(), admins=(), prompts=[f"Describe the river {i}" for i in range(5)])
    rerank_project(database, "demo", reward_model_scorer(str(model_dir)), "rm")
    model, tokenizer = load_reward_model(str(model_dir))
    with database.read() as session:
        items = session.scalars(select(Item).order_by(Item.priority)).all()
    gaps = [abs(a - b) for a, b in (score_texts(model, tokenizer, [i.prompt] * 2, i.candidates) for i in items)]
    assert gaps == sorted(gaps) and [i.priority for i in items] == pytest.approx(gaps, rel=1e-4)
    database.dispose()


def test_exported_rows_are_valid_training_rows(db, make_project, tmp_path):
    from preftune.annotate.aggregate import write_jsonl
    from preftune.data.load import load_records

    make_project(db, kind="ranking", items=2, candidates=3, annotators=("a",), admins=())
    proj, me = project(db), ids(db, ["a"])["a"]
    label_all(db, proj, me, lambda item, order: {"ranking": ["A", "B", "C"]})
    with db.read() as session:
        path = write_jsonl(export_pairs(session, proj, margin_scale=0.5, weighting="votes"), tmp_path / "pairs.jsonl")
    rows = load_records(str(path)).rows
    assert len(rows) == 6  # 2 items x 3 pairs
    assert all(set(r) >= {"prompt", "chosen", "rejected", "preference_prob", "margin"} for r in rows)
    assert {r["margin"] for r in rows} == {0.5, 1.0}
    assert json.loads(path.read_text().splitlines()[0])["preference_prob"] == 1.0
