"""Annotator competence, end to end: simulated annotators of known accuracy label the toy task through the
HTTP API; the estimated competences are within 0.1 of the truth, and DPO on the competence-weighted export
reaches a higher held-out oracle score than DPO on the majority vote (3 seeds).

The people: three careful annotators right 90% of the time, two at chance (50%) and one adversary (20%),
each item labelled by 3 of them (overlap 3) with gold items mixed in at 20%. The oracle is the toy task's
own preference (calm words beat loud ones, :func:`toydata.calm_minus_loud`). The held-out oracle score is
the mean implied-reward margin of the trained policy toward the oracle's choice on fresh pairs one calm
word apart (``eval/rewards/margins``, continuous: the share ranked right, ``eval/rewards/accuracies``,
is also compared, and must be no lower). The figures the README quotes are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from preftune.annotate.app import create_app  # noqa: E402
from preftune.annotate.db import Database  # noqa: E402
from preftune.annotate.importer import ItemSpec, add_items, ensure_project  # noqa: E402
from preftune.annotate.members import add_member  # noqa: E402
from preftune.annotate.tokens import add_annotator  # noqa: E402
from toydata import CALM_WORDS, LOUD_WORDS, TOPICS, calm_minus_loud  # noqa: E402

ACCURACY = {"careful-1": 0.9, "careful-2": 0.9, "careful-3": 0.9, "random-1": 0.5, "random-2": 0.5,
            "adversary": 0.2}
ITEMS, GOLD, OVERLAP, GOLD_RATE = 450, 30, 3, 0.15
SEEDS = (0, 1, 2)


def toy_pair(rng: random.Random) -> tuple[str, list[str]]:
    """A prompt and two responses in random order: one mostly calm, one mostly loud."""
    topic = rng.choice(TOPICS)
    calm = " " + " ".join([rng.choice(CALM_WORDS) for _ in range(3)] + [rng.choice(LOUD_WORDS)])
    loud = " " + " ".join([rng.choice(LOUD_WORDS) for _ in range(3)] + [rng.choice(CALM_WORDS)])
    pair = [calm, loud]
    rng.shuffle(pair)
    return f"Describe {topic} in a few words:", pair


def better(texts: list[str]) -> int:
    scores = calm_minus_loud([], texts)
    return 0 if scores[0] > scores[1] else 1


def simulate(tmp_path, seed: int, monkeypatch) -> dict:
    """Import, label through the API with simulated people, and read competences and exports as an admin would."""
    from preftune.annotate import queue

    rng = random.Random(seed)
    served = random.Random(seed + 1000)  # the server's display orders and gold draws, seeded for a repeatable test
    monkeypatch.setattr(queue, "_shuffle", served.shuffle)
    monkeypatch.setattr(queue, "_chance", served.random)
    db = Database(f"sqlite:///{tmp_path / f'sim-{seed}.db'}")
    db.upgrade()
    specs = []
    for i in range(ITEMS + GOLD):
        prompt, texts = toy_pair(rng)
        gold = better(texts) if i >= ITEMS else None
        specs.append(ItemSpec(f"item-{i}", prompt, texts, gold=gold))
    with db.write() as session:
        project, _ = ensure_project(session, "toy", "pairwise", overlap=OVERLAP, gold_rate=GOLD_RATE)
        add_items(session, project, specs, seed=seed)
        tokens = {name: add_annotator(session, name)[1] for name in ACCURACY}
        for name in ACCURACY:
            add_member(session, "toy", name)
        tokens["boss"] = add_annotator(session, "boss", is_admin=True)[1]
    app = create_app(db)
    clients = {name: TestClient(app, headers={"authorization": f"Bearer {token}"}) for name, token in tokens.items()}
    waiting = {name: clients[name].get("/api/projects/1/next").json()["item"] for name in ACCURACY}
    labelled = 0
    while any(waiting.values()):
        name = rng.choice([n for n, item in waiting.items() if item])
        item = waiting[name]
        texts = [c["text"] for c in item["candidates"]]  # in the order this annotator sees them
        right = better(texts)
        choice = "AB"[right if rng.random() < ACCURACY[name] else 1 - right]
        reply = clients[name].post(f"/api/projects/1/items/{item['item_id']}/label?next=true",
                                   json={"choice": choice, "request_id": f"{name}-{item['item_id']}"})
        assert reply.status_code == 201, reply.text
        waiting[name] = reply.json()["next"]
        labelled += 1
    boss = clients["boss"]
    stats = boss.get("/admin/p/1/stats.json").json()
    weighted = [json.loads(line) for line in boss.get("/admin/p/1/export.jsonl").text.splitlines()]
    majority = [json.loads(line) for line in boss.get("/admin/p/1/export.jsonl?weighting=votes").text.splitlines()]
    page = boss.get("/admin").text
    db.dispose()
    return {"stats": stats, "weighted": weighted, "majority": majority, "labelled": labelled, "page": page}


def subtle_pairs(n: int, seed: int) -> list[dict]:
    """Held-out oracle pairs one calm word apart (k+1 calm words of 4 against k): harder than the training pairs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(4)
        words = lambda calm: [rng.choice(CALM_WORDS) for _ in range(calm)] + [rng.choice(LOUD_WORDS)  # noqa: E731
                                                                            for _ in range(4 - calm)]
        chosen, rejected = words(k + 1), words(k)
        rng.shuffle(chosen)
        rng.shuffle(rejected)
        rows.append({"prompt": f"Describe {rng.choice(TOPICS)} in a few words:", "chosen": " " + " ".join(chosen),
                     "rejected": " " + " ".join(rejected)})
    return rows


def label_accuracy(rows: list[dict]) -> float:
    return sum(better([r["chosen"], r["rejected"]]) == 0 for r in rows) / len(rows)


def train(tmp_path, model_dir, rows: list[dict], eval_path, name: str, seed: int) -> float:
    from preftune import DPOConfig
    from preftune.recipes.dpo import train_dpo

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected", "preference_prob")}) + "\n"
                            for r in rows))
    cfg = DPOConfig(model_name_or_path=str(model_dir), dataset=str(data), eval_dataset=str(eval_path),
                    eval_split="train", output_dir=str(tmp_path / name), per_device_batch_size=16, learning_rate=5e-4,
                    max_length=64, max_steps=-1, num_epochs=1, warmup_ratio=0.0, beta=0.1, seed=seed,
                    precompute_ref=True, logging_steps=100, cache_dir=str(tmp_path / f"{name}-ref"))
    cfg.validate()
    metrics = train_dpo(cfg).train.eval_metrics
    return round(metrics["eval/rewards/accuracies"], 4), round(metrics["eval/rewards/margins"], 4)


@pytest.mark.slow
def test_simulated_annotators_competence_and_weighted_dpo_beats_majority(tmp_path, tiny_model_dir, one_thread,
                                                                          monkeypatch):
    eval_path = tmp_path / "oracle-eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in subtle_pairs(128, seed=99)))
    figures = []
    for seed in SEEDS:
        run = simulate(tmp_path, seed, monkeypatch)
        gold_labels = run["labelled"] - ITEMS * OVERLAP  # gold items are mixed into work: nearly all reach everyone
        assert 0.9 * GOLD * len(ACCURACY) <= gold_labels <= GOLD * len(ACCURACY)
        by_name = {c["annotator"]: c for c in run["stats"]["competence"]["annotators"]}
        errors = {name: by_name[name]["competence"] - truth for name, truth in ACCURACY.items()}
        assert all(abs(e) <= 0.1 for e in errors.values()), errors
        assert by_name["adversary"]["flag"] == "worse than chance"
        assert all(by_name[f"careful-{i}"]["flag"] is None for i in (1, 2, 3))
        gold = {s["annotator"]: s["gold_accuracy"] for s in run["stats"]["stats"]}
        assert gold["adversary"] < 0.5 < gold["careful-1"]
        assert "Competence" in run["page"] and "Gold accuracy" in run["page"]
        weighted, majority = run["weighted"], run["majority"]
        assert len(weighted) == ITEMS + GOLD and ITEMS <= len(majority) <= ITEMS + GOLD  # 3-3 splits of gold dropped
        label_acc = (label_accuracy(weighted), label_accuracy(majority))
        assert label_acc[0] > label_acc[1]
        scores = tuple(train(tmp_path / f"seed{seed}", tiny_model_dir, rows, eval_path, name, seed)
                       for name, rows in (("weighted", weighted), ("majority", majority)))
        figures.append({"seed": seed, "competence_error": max(abs(e) for e in errors.values()),
                        "label_accuracy": label_acc, "oracle_score": scores})
    print("\nsimulated annotators:", json.dumps(figures))
    for figure in figures:  # (accuracy, margin) on the held-out oracle pairs: weighted vs majority
        (weighted_accuracy, weighted_margin), (majority_accuracy, majority_margin) = figure["oracle_score"]
        assert weighted_margin > majority_margin and weighted_accuracy >= majority_accuracy, figures
    mean = [sum(f["oracle_score"][k][1] for f in figures) / len(figures) for k in (0, 1)]
    assert mean[0] > 1.1 * mean[1], figures
