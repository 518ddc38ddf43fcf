"""The admin commands: tokens, projects, export, agreement statistics, migrations, user errors."""

import json

import pytest
from sqlalchemy import select

from preftune.annotate import queue
from preftune.annotate.db import Database
from preftune.annotate.importer import get_project
from preftune.annotate.models import Annotator, Item
from preftune.annotate.tokens import hash_token
from preftune.cli import main


def run(capsys, *args):
    code = main(["annotate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tokens_are_issued_once_listed_rotated_and_revoked(tmp_path, capsys):
    db = str(tmp_path / "a.db")
    code, out, err = run(capsys, "token", "add", "ana", "--db", db)
    token = out.strip()
    assert code == 0 and token.startswith("pt_") and "shown once" in err
    code, out, _ = run(capsys, "token", "add", "lead", "--admin", "--db", db)
    assert code == 0
    code, out, _ = run(capsys, "token", "list", "--db", db)
    assert "ana" in out and "admin" in out and token not in out
    database = Database(db)
    with database.read() as session:
        assert session.scalar(select(Annotator.token_hash).where(Annotator.name == "ana")) == hash_token(token)
    code, out, _ = run(capsys, "token", "rotate", "ana", "--db", db)
    assert out.strip() != token
    code, out, _ = run(capsys, "token", "revoke", "ana", "--db", db)
    assert code == 0 and "revoked ana" in out
    code, _, err = run(capsys, "token", "add", "ana", "--db", db)
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "token", "add", "bad name!", "--db", db)
    assert code == 2 and "annotator name" in err
    database.dispose()


def test_export_and_stats_from_two_annotators(db_url, db, make_project, tmp_path, capsys):
    make_project(db, items=6, overlap=2, annotators=("ann", "ben"), admins=())
    with db.read() as session:
        project = get_project(session, "demo")
        ids = {a.name: a.id for a in session.scalars(select(Annotator))}
    for name in ("ann", "ben"):
        while (served := queue.next_item(db, project, ids[name])) is not None:
            disagree = name == "ben" and served.item.external_id == "item-0"
            winner = 1 if disagree else 0
            choice = "AB"[served.assignment.display_order.index(winner)]
            queue.submit(db, project, ids[name], served.item.id, {"choice": choice}, "", f"{name}-{served.item.id}")
    out_file = tmp_path / "pairs.jsonl"
    code, out, _ = run(capsys, "export", "--db", db_url, "--project", "demo", "--output", str(out_file))
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert code == 0 and "wrote 5 pairs" in out and len(rows) == 5  # item-0 is split 1:1 and dropped
    # equally competent (each agrees with the other on 5 of 6): two agreeing votes, posterior below 1
    assert all(0.9 < r["preference_prob"] < 1.0 and r["vote_share"] == 1.0 for r in rows)
    code, out, _ = run(capsys, "export", "--db", db_url, "--project", "demo", "--output", str(out_file),
                       "--weighting", "votes")
    assert all(json.loads(line)["preference_prob"] == 1.0 for line in out_file.read_text().splitlines())
    code, out, _ = run(capsys, "export", "--db", db_url, "--project", "demo", "--output", str(out_file), "--ties",
                       "keep")
    assert "wrote 6 pairs" in out
    code, out, _ = run(capsys, "export", "--db", db_url, "--project", "demo", "--output", str(out_file), "--raw")
    assert "wrote 12 labels" in out and "display_order" in out_file.read_text()
    code, out, _ = run(capsys, "stats", "--db", db_url, "--project", "demo")
    assert code == 0 and "Cohen's kappa" in out and "ann" in out and "ben" in out
    code, out, _ = run(capsys, "stats", "--db", db_url, "--project", "demo", "--json")
    report = json.loads(out)
    assert report["agreement"]["headline"]["name"] == "Cohen's kappa"
    # ann always says +1 (candidate 0 wins); ben agrees on 5 of 6: p_o = p_e = 5/6, so kappa is 0
    assert report["agreement"]["cohen_kappa"] == pytest.approx(0.0, abs=1e-9)
    assert {s["annotator"]: s["labels"] for s in report["stats"]} == {"ann": 6, "ben": 6}


def test_raising_the_overlap_reopens_complete_items(tmp_path, capsys, make_project):
    db_path = str(tmp_path / "a.db")
    database = Database(db_path)
    database.upgrade()
    make_project(database, items=2, overlap=1, annotators=("ann",), admins=())
    with database.read() as session:
        project = get_project(session, "demo")
        ann = session.scalar(select(Annotator.id))
    while (served := queue.next_item(database, project, ann)) is not None:
        queue.submit(database, project, ann, served.item.id, {"choice": "A"}, "", str(served.item.id))
    code, out, _ = run(capsys, "project", "demo", "--overlap", "2", "--db", db_path)
    assert code == 0 and "demo" in out
    with database.read() as session:
        assert not any(session.scalars(select(Item.complete)))
    code, out, _ = run(capsys, "project", "--db", db_path)
    assert "demo" in out and "2 / 4" in out
    database.dispose()


@pytest.mark.parametrize("args, message", [
    (["export", "--project", "nope", "--output", "x.jsonl"], "no project named 'nope'"),
    (["stats", "--project", "nope"], "no project named 'nope'"),
    (["serve", "--reward-model", "/does/not/exist"], "reward model /does/not/exist not found"),
    (["project", "nope", "--overlap", "2"], "no project named 'nope'"),
])
def test_user_errors_exit_2_with_a_message(tmp_path, capsys, args, message):
    code, _, err = run(capsys, *args, "--db", str(tmp_path / "a.db"))
    assert code == 2 and message in err and "Traceback" not in err


def test_a_foreign_database_is_refused(tmp_path, capsys):
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE things (x)")
    code, _, err = run(capsys, "migrate", "--db", str(path))
    assert code == 2 and "not a preftune annotation database" in err
    code, _, err = run(capsys, "migrate", "--db", str(tmp_path / "no-such-dir" / "a.db"))
    assert code == 2 and "does not exist" in err
