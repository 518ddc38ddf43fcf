"""``preftune iterate`` judged by people: candidates go to the annotation server, labels come back through its API.

The test plays the annotators: it rates every candidate through the server's HTTP API (1-7, higher
for calmer text) while iterate waits; a run stopped while waiting is resumed without importing again
or losing a label.
"""

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from preftune.annotate.app import create_app  # noqa: E402
from preftune.annotate.db import Database  # noqa: E402
from preftune.annotate.tokens import add_annotator  # noqa: E402
from preftune.config import IterateConfig  # noqa: E402
from preftune.iterate import people as iterate_people  # noqa: E402
from preftune.iterate.rounds import train_iterate  # noqa: E402
from toydata import calm_count, calm_minus_loud, toy_prompt_rows  # noqa: E402


class Stopped(Exception):
    pass


def rating(text: str) -> int:
    """The simulated person: 1 for no calm word, up to 7."""
    return min(7, 1 + 2 * int(calm_count([""], [text])[0]))


class Annotator:
    """Labels items through the JSON API, as a labelling client would."""

    def __init__(self, client: TestClient):
        self.client = client
        self.labelled = 0

    def project_ids(self) -> list[int]:
        """Each round has its own project, calm-round<r>."""
        return [p["id"] for p in self.client.get("/api/projects").json() if p["name"].startswith("calm-round")]

    def label(self, limit: int | None = None) -> int:
        """Label items until none is waiting (or ``limit`` were labelled); returns how many."""
        done = 0
        for project in self.project_ids():
            done += self._label(project, None if limit is None else limit - done)
        self.labelled += done
        return done

    def _label(self, project: int, limit: int | None) -> int:
        done = 0
        while limit is None or done < limit:
            item = self.client.get(f"/api/projects/{project}/next").json()["item"]
            if item is None:
                break
            scores = [rating(c["text"]) for c in item["candidates"]]
            answer = {"scores": scores, "request_id": f"label-{item['item_id']}"}
            reply = self.client.post(f"/api/projects/{project}/items/{item['item_id']}/label", json=answer)
            assert reply.status_code == 201, reply.text
            done += 1
        return done


def test_people_judge_the_rounds_and_a_stopped_run_resumes_without_reimporting(tmp_path, tiny_tokenizer, one_thread,
                                                                                monkeypatch):
    from preftune.toy import build_tiny_llama

    build_tiny_llama(tiny_tokenizer).save_pretrained(tmp_path / "init")
    tiny_tokenizer.save_pretrained(tmp_path / "init")
    for name, rows in (("train.jsonl", toy_prompt_rows(12, seed=0)), ("eval.jsonl", toy_prompt_rows(8, seed=1))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    db = Database(url)
    db.upgrade()
    with db.write() as session:
        token = add_annotator(session, "pat", is_admin=True)[1]
    person = Annotator(TestClient(create_app(db), headers={"authorization": f"Bearer {token}"}))
    settings = dict(model_name_or_path=str(tmp_path / "init"), dataset=str(tmp_path / "train.jsonl"),
                    eval_dataset=str(tmp_path / "eval.jsonl"), eval_split="train", output_dir=str(tmp_path / "run"),
                    rounds=2, samples_per_prompt=4, max_new_tokens=16, max_length=64, learning_rate=1e-2, max_steps=4,
                    per_device_batch_size=4, warmup_ratio=0.0, annotate_db=url, project="calm",
                    annotate_poll_seconds=0.05, missing_eos="keep")   # the toy model seldom ends in 16 tokens

    # 1. stopped while waiting for round 1's labels (after its items were imported)
    def stop(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(iterate_people, "wait_for_labels", stop)
    with pytest.raises(Stopped):
        train_iterate(IterateConfig(**settings), oracle=calm_minus_loud)
    monkeypatch.undo()
    imported = json.loads((tmp_path / "run" / "rounds" / "1" / "annotate_import.json").read_text())["ids"]
    assert 0 < len(imported) <= 12
    assert person.label(limit=3) == 3   # some labels arrive while nothing runs

    # 2. resumed: it waits, the person labels the rest of round 1, then all of round 2
    result, errors = {}, []

    def run():
        try:
            result["run"] = train_iterate(IterateConfig(**settings, resume="latest"), oracle=calm_minus_loud)
        except Exception as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    while worker.is_alive() and time.monotonic() < deadline:
        person.label()
        time.sleep(0.05)
    worker.join(timeout=1)
    assert not errors, errors
    run_dir = Path(result["run"].run_dir)

    with db.read() as session:
        from sqlalchemy import func, select

        from preftune.annotate.models import Item, Label

        items = session.scalars(select(Item.external_id)).all()
        labels = session.scalar(select(func.count()).select_from(Label))
    round2 = json.loads((run_dir / "rounds" / "2" / "annotate_import.json").read_text())["ids"]
    assert sorted(items) == sorted(imported + round2)   # nothing imported twice
    assert labels == person.labelled == len(items)      # every label kept, one per item (overlap 1)
    for round_ in (1, 2):
        round_dir = run_dir / "rounds" / str(round_)
        judged = json.loads((round_dir / "judged.json").read_text())
        assert judged["stats"]["items_complete"] == judged["stats"]["items"]
        for texts, scores in zip(judged["texts"], judged["scores"]):
            ratings = [rating(t) for t in texts]   # the person's ratings, read back as expected candidates beaten
            assert all((scores[i] > scores[j]) == (ratings[i] > ratings[j]) for i in range(len(texts))
                       for j in range(len(texts)))
            assert sum(scores) == pytest.approx(len(texts) * (len(texts) - 1) / 2)
        pairs = [json.loads(line) for line in (round_dir / "pairs.jsonl").read_text().splitlines()]
        assert pairs and all(rating(p["chosen"]) > rating(p["rejected"]) for p in pairs)
        assert (round_dir / "train" / "model" / "model.safetensors").is_file()
    assert "oracle_reward" in result["run"].rounds[-1]["eval"]
    db.dispose()


def test_a_reused_project_name_stops_the_run_instead_of_mixing_runs(tmp_path, capsys):
    from types import SimpleNamespace

    from preftune.errors import ConfigError

    db = Database(f"sqlite:///{tmp_path / 'labels.db'}")
    db.upgrade()
    cfg = SimpleNamespace(project="calm", annotate_kind="rating", annotate_overlap=1, seed=0)
    first = iterate_people.import_round(cfg, db, 1, ["Describe the river:"], [[" calm kind", " loud rude"]])
    assert first == ["round1-prompt0"]
    assert "has no members" in capsys.readouterr().err
    # the same run resumed: nothing new, no error
    assert iterate_people.import_round(cfg, db, 1, ["Describe the river:"], [[" calm kind", " loud rude"]]) == first
    # another run with the same --project: its round 1 holds other texts
    with pytest.raises(ConfigError, match="used by another run"):
        iterate_people.import_round(cfg, db, 1, ["Describe the city:"], [[" warm", " cold"]])
    with db.read() as session:
        from preftune.annotate.importer import get_project

        assert get_project(session, "calm-round1").name == "calm-round1"   # rounds get their own projects
    db.dispose()
