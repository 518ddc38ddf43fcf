"""Binary (thumbs up / down) questions and the unpaired KTO export, on SQLite and PostgreSQL."""

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from preftune.annotate import queue
from preftune.annotate.app import create_app
from preftune.annotate.importer import get_project
from preftune.annotate.models import Annotator, Label
from preftune.annotate.unpaired import export_kto
from preftune.cli import main


def run(capsys, *args):
    code = main(["annotate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def label_all(db, project_name: str, answers: dict[str, dict[str, dict]]) -> None:
    """``answers[annotator][external_id]``: the fields each annotator submits (missing items are skipped)."""
    with db.read() as session:
        project = get_project(session, project_name)
        ids = {a.name: a.id for a in session.scalars(select(Annotator))}
    for name, by_item in answers.items():
        while (served := queue.next_item(db, project, ids[name])) is not None:
            fields = by_item.get(served.item.external_id)
            if fields is None:
                queue.skip(db, project, ids[name], served.item.id)
                continue
            if fields.get("choice") in (0, 1):  # the canonical candidate, named by the letter it is shown under
                fields = {"choice": "AB"[served.assignment.display_order.index(fields["choice"])]}
            queue.submit(db, project, ids[name], served.item.id, fields, "", f"{name}-{served.item.id}")


def test_binary_answers_over_the_api_valid_and_invalid(db, make_project):
    tokens = make_project(db, kind="binary", items=2, candidates=1, overlap=2, annotators=("ana", "ben"))
    app = create_app(db)
    ana = TestClient(app, headers={"authorization": f"Bearer {tokens['ana']}"})
    item = ana.get("/api/projects/1/next").json()["item"]
    assert item["kind"] == "binary" and len(item["candidates"]) == 1
    url = f"/api/projects/1/items/{item['item_id']}/label"
    for bad in ({"thumb": "maybe"}, {"thumb": 5}, {"thumb": ["up"]}, {"thumb": None}, {"choice": "A"}, {}):
        reply = ana.post(url, json={**bad, "request_id": "bad"})
        assert reply.status_code == 422, (bad, reply.text)
        assert "thumb" in reply.json()["detail"]
    assert ana.post(url, json={"thumb": "+", "request_id": "a1", "note": "friendly"}).status_code == 201
    second = ana.get("/api/projects/1/next").json()["item"]["item_id"]
    reply = ana.post(f"/api/projects/1/items/{second}/label", json={"thumb": False, "request_id": "a2"})
    assert reply.status_code == 201
    ben = TestClient(app, headers={"authorization": f"Bearer {tokens['ben']}"})
    first = ben.get("/api/projects/1/next").json()["item"]["item_id"]
    reply = ben.post(f"/api/projects/1/items/{first}/label", json={"thumb": "D", "request_id": "b1"})
    assert reply.status_code == 201
    with db.read() as session:
        stored = sorted((label.annotator_id, label.answer["thumb"], label.note)
                        for label in session.scalars(select(Label)))
    assert stored == [(1, "down", ""), (1, "up", "friendly"), (2, "down", "")]
    mine = ana.get("/api/projects/1/labels").json()
    assert sorted(m["answer"] for m in mine) == ["thumbs down", "thumbs up"]
    boss = TestClient(app, headers={"authorization": f"Bearer {tokens['boss']}"})
    assert boss.get("/admin/p/1/export.jsonl").status_code == 422  # no pairs in a binary project
    assert boss.get("/admin/p/1/kto.jsonl?min_agreement=2").status_code == 422
    exported = [json.loads(line) for line in boss.get("/admin/p/1/kto.jsonl?weighting=votes").text.splitlines()]
    assert sorted((r["label"], r["label_prob"]) for r in exported) == [(False, 1.0)]  # the other item is split 1:1
    assert "KTO rows" in boss.get("/admin").text


def test_binary_export_majority_label_prob_min_agreement_and_alpha(db_url, db, make_project, tmp_path, capsys):
    make_project(db, kind="binary", items=4, candidates=1, overlap=3, annotators=("a", "b", "c"), admins=())
    up, down = {"thumb": "up"}, {"thumb": "down"}
    label_all(db, "demo", {"a": {"item-0": up, "item-1": up, "item-2": up, "item-3": up},
                           "b": {"item-0": up, "item-1": down, "item-2": up, "item-3": down},
                           "c": {"item-0": up, "item-1": down, "item-2": down}})
    out_file = tmp_path / "kto.jsonl"
    code, out, _ = run(capsys, "export", "--db", db_url, "--project", "demo", "--output", str(out_file),
                       "--format", "kto", "--weighting", "votes")
    rows = {r["item"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    assert code == 0 and "wrote 3 KTO rows" in out  # item-3 is split 1:1 and dropped
    assert {k: (r["label"], r["label_prob"], r["annotators"]) for k, r in rows.items()} == {
        "item-0": (True, 1.0, 3), "item-1": (False, round(2 / 3, 6), 3), "item-2": (True, round(2 / 3, 6), 3)}
    assert rows["item-1"]["prompt"] == "Prompt 1" and rows["item-1"]["completion"] == "response 1.0"
    code, out, _ = run(capsys, "export", "--db", db_url, "--project", "demo", "--output", str(out_file),
                       "--format", "kto", "--min_agreement", "0.7", "--weighting", "votes")
    assert "wrote 1 KTO rows" in out and json.loads(out_file.read_text())["item"] == "item-0"
    code, _, err = run(capsys, "export", "--db", db_url, "--project", "demo", "--output", str(out_file))
    assert code == 2 and "--format kto" in err
    code, out, _ = run(capsys, "stats", "--db", db_url, "--project", "demo", "--json")
    agreement = json.loads(out)["agreement"]
    # by hand: coincidences o(+,+)=4, o(+,-)=o(-,+)=3, o(-,-)=1; n+=7, n-=4, n=11
    # D_o = 6/11, D_e = 2*7*4/(11*10) = 56/110, alpha = 1 - (6/11)/(56/110) = -1/14
    assert agreement["metric"] == "nominal" and agreement["headline"]["name"] == "Krippendorff's alpha"
    assert agreement["krippendorff_alpha"] == pytest.approx(-1 / 14)


def test_kto_export_from_pairwise_ranking_and_rating_projects(db_url, db, make_project, tmp_path, capsys):
    make_project(db, kind="pairwise", items=3, overlap=2, annotators=("ann", "ben"), admins=())
    label_all(db, "demo", {"ann": {"item-0": {"choice": 0}, "item-1": {"choice": 0}, "item-2": {"choice": "tie"}},
                           "ben": {"item-0": {"choice": 0}, "item-1": {"choice": 1}, "item-2": {"choice": 1}}})
    out_file = tmp_path / "kto.jsonl"
    code, out, _ = run(capsys, "export", "--db", db_url, "--project", "demo", "--output", str(out_file),
                       "--format", "kto", "--weighting", "votes")
    rows = sorted((r["item"], r["completion"], r["label"], r["label_prob"])
                  for r in map(json.loads, out_file.read_text().splitlines()))
    # item-0: both pick 0; item-1: split 1:1, dropped; item-2: the tie gives no vote, ben's decides
    assert code == 0 and rows == [("item-0", "response 0.0", True, 1.0), ("item-0", "response 0.1", False, 1.0),
                                  ("item-2", "response 2.0", False, 1.0), ("item-2", "response 2.1", True, 1.0)]

    make_project(db, kind="ranking", items=1, candidates=3, project="rank", annotators=("cy",), admins=())
    make_project(db, kind="rating", items=1, candidates=3, project="rate", annotators=("di",), admins=())
    label_all(db, "rank", {"cy": {"item-0": {"ranking": ["B", "C", "A"]}}})
    label_all(db, "rate", {"di": {"item-0": {"scores": ["6", "4", "2"]}}})
    with db.read() as session:
        rank, rate = get_project(session, "rank"), get_project(session, "rate")
        order = session.scalar(select(Label.answer).where(Label.project_id == rank.id))["ranking"]
        ranked = {r["completion"]: r["label"] for r in export_kto(session, rank)}
        scores = session.scalar(select(Label.answer).where(Label.project_id == rate.id))["scores"]
        midpoint = {r["completion"]: r["label"] for r in export_kto(session, rate)}
        high = {r["completion"]: r["label"] for r in export_kto(session, rate, rating_threshold=5)}
    assert ranked == {f"response 0.{order[0]}": True, f"response 0.{order[-1]}": False}
    assert sorted(scores) == [2, 4, 6]
    expect = {f"response 0.{i}": s > 4 for i, s in enumerate(scores) if s != 4}  # 4 is the midpoint: no vote
    assert midpoint == expect and len(midpoint) == 2
    assert high == {f"response 0.{i}": s > 5 for i, s in enumerate(scores)} and sum(high.values()) == 1


@pytest.mark.parametrize("args, message", [
    (["--format", "kto", "--min_agreement", "1.5"], "min_agreement must be from 0 to 1"),
    (["--format", "kto", "--rating_threshold", "nan"], "rating_threshold must be from 1 to 7"),
    (["--format", "kto", "--raw"], "--raw writes every label"),
])
def test_bad_kto_export_options_exit_2(tmp_path, make_project, capsys, args, message):
    from preftune.annotate.db import Database

    url = f"sqlite:///{tmp_path / 'a.db'}"
    database = Database(url)
    database.upgrade()
    make_project(database, kind="rating", items=1)
    database.dispose()
    code, _, err = run(capsys, "export", "--db", url, "--project", "demo", "--output", str(tmp_path / "x"), *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_binary_import_takes_one_response_or_splits_several(tmp_path, capsys):
    rows = [{"id": "one", "prompt": "p1", "completion": "only answer"},
            {"id": "pair", "prompt": "p2", "chosen": "good", "rejected": "bad"}]
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = str(tmp_path / "a.db")
    code, out, _ = run(capsys, "import", str(source), "--project", "thumbs", "--kind", "binary", "--db", db)
    assert code == 0 and "3 items added" in out
    code, out, _ = run(capsys, "import", str(source), "--project", "thumbs", "--db", db)  # the kind is kept
    assert code == 0 and "0 items added, 3 already present" in out
    code, _, err = run(capsys, "import", str(source), "--project", "pairs", "--kind", "pairwise", "--db", db)
    assert code == 2 and "no candidate responses" in err and "row 1" in err
