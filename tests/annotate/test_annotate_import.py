"""``preftune annotate import``: items from files or sampled from a model; bad rows named like bad training data."""

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from preftune.annotate.db import Database
from preftune.annotate.importer import add_items, ensure_project, read_items
from preftune.annotate.models import Item, Project
from preftune.cli import main
from preftune.errors import DataError


def write(path: Path, rows) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    else:
        path.write_text(rows)
    return path


def items_of(db_path, project="p"):
    database = Database(str(db_path))
    with database.read() as session:
        found = session.scalars(select(Item).join(Project).where(Project.name == project).order_by(Item.id)).all()
    database.dispose()
    return found


def test_import_reads_every_candidate_layout_and_is_idempotent(tmp_path, capsys):
    db = tmp_path / "a.db"
    data = write(tmp_path / "items.jsonl", [
        {"id": "q1", "prompt": "Say hi", "responses": ["hi", "hello", "hey"], "topic": "greeting"},
        {"prompt": "Say bye", "chosen": "bye", "rejected": "go away"},
    ])
    assert main(["annotate", "import", str(data), "--db", str(db), "--project", "p", "--kind", "ranking",
                 "--overlap", "2"]) == 0
    assert "2 items added" in capsys.readouterr().out
    first, second = items_of(db)
    assert (first.external_id, first.candidates, first.meta) == ("q1", ["hi", "hello", "hey"], {"topic": "greeting"})
    assert second.candidates == ["bye", "go away"]
    assert main(["annotate", "import", str(data), "--db", str(db), "--project", "p"]) == 0
    assert "0 items added, 2 already present" in capsys.readouterr().out

    csv = write(tmp_path / "items.csv", "prompt,response_1,response_2,response_3\nA?,x,y,\nB?,u,v,w\n")
    assert main(["annotate", "import", str(csv), "--db", str(db), "--project", "pairs"]) == 0
    pairs = items_of(db, "pairs")  # pairwise: three candidates become three pairs
    assert [i.candidates for i in pairs] == [["x", "y"], ["u", "v"], ["u", "w"], ["v", "w"]]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "ok", "responses": ["a", "b"]}, {"responses": ["a", "b"]}],
     "row 2: field 'prompt': expected a non-empty string, missing"),
    ([{"prompt": "ok", "responses": ["only one"]}], "row 1: field 'responses': needs at least 2 candidate responses"),
    ([{"prompt": "ok", "responses": ["a", "b"]}, "{not json"], "row 2: invalid JSON"),
    ([{"prompt": "ok", "responses": "a, b"}], "row 1: field 'responses': expected a list of strings, got str"),
    ([{"prompt": "ok", "responses": ["same", "same"]}], "row 1: field 'responses': candidates 1 and 2 are identical"),
    ([{"prompt": "ok", "responses": ["a", 3]}], "row 1: field 'responses[1]': expected a non-empty string, got int"),
    ([{"id": 7, "prompt": "x", "responses": ["a", "b"]}, {"id": "7", "prompt": "y", "responses": ["a", "b"]}],
     "row 2: field 'id': duplicate id '7' (first used on row 1)"),
    ([{"prompt": "   ", "responses": ["a", "b"]}], "row 1: field 'prompt': is empty"),
    ([{"prompt": "ok"}], "row 1: no candidate responses"),
])
def test_malformed_rows_get_row_numbered_errors(tmp_path, rows, message):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        read_items(str(path))
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_a_bad_file_exits_2_without_a_traceback(tmp_path, capsys):
    path = write(tmp_path / "bad.jsonl", [{"prompt": "ok", "responses": ["a", "b"]}, {"prompt": 5, "responses": []}])
    assert main(["annotate", "import", str(path), "--db", str(tmp_path / "a.db"), "--project", "p"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: row 2: field 'prompt'" in err and "Traceback" not in err
    assert main(["annotate", "import", str(tmp_path / "missing.jsonl"), "--db", str(tmp_path / "a.db"),
                 "--project", "p"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_project_settings_are_checked(tmp_path):
    database = Database(str(tmp_path / "a.db"))
    database.upgrade()
    from preftune.annotate.importer import ProjectError

    with database.write() as session:
        project, created = ensure_project(session, "p", "rating", "# hi", 2, False)
        assert created and (project.kind, project.overlap, project.allow_notes) == ("rating", 2, False)
        with pytest.raises(ProjectError, match="overlap"):
            ensure_project(session, "p", overlap=0)
        with pytest.raises(ProjectError, match="question kind"):
            ensure_project(session, "q", kind="stars")
    with database.write() as session:
        project, _ = ensure_project(session, "p")
        rows = [{"prompt": "x", "responses": ["a", "b"]}]
        add_items(session, project, read_items(str(write(tmp_path / "i.jsonl", rows))))
    with database.write() as session, pytest.raises(ProjectError, match="cannot become pairwise"):
        ensure_project(session, "p", kind="pairwise")
    database.dispose()


def test_candidates_can_be_sampled_from_a_model(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("preftune.generate")
    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": "Describe the river in a few words:"},
                                                 {"prompt": "Describe a garden in a few words:",
                                                  "responses": ["calm"]}])
    db = tmp_path / "a.db"
    code = main(["annotate", "import", str(prompts), "--db", str(db), "--project", "p", "--kind", "ranking",
                 "--model", str(tiny_model_dir), "--num-candidates", "4", "--max-new-tokens", "6", "--seed", "0"])
    assert code == 0, capsys.readouterr().err
    first, second = items_of(db)
    assert 2 <= len(first.candidates) <= 4 and all(c.strip() for c in first.candidates)
    assert second.candidates[0] == "calm" and len(second.candidates) >= 3  # given responses are kept
    assert first.meta["generated_by"] == str(tiny_model_dir)
