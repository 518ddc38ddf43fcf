"""End to end in a real browser: an annotator labels with mouse and keyboard, an admin exports, DPO (or KTO) trains.

Chromium (Debian's package) is driven by Playwright against the server running in a subprocess.
With PREFTUNE_SCREENSHOTS=1 the SQLite run saves the README's screenshots under docs/images/.
"""

import json
import os
from pathlib import Path

import httpx

from toydata import CALM_WORDS, make_toy_preferences

ROOT = Path(__file__).resolve().parents[2]
XSS_PROMPT = "<script>window.__pwned = 1</script> Describe the harbour in a few words:"
GUIDELINES = """Pick the response that is **kinder and calmer**.

* Prefer gentle, patient, honest wording.
* Use *tie* only when both are equally good (or equally bad).
* Add a note when you hesitate.
"""


def calm_letter(page) -> str:
    """The letter of the response made of calm words (the toy task's right answer)."""
    for letter in "AB":
        text = page.inner_text(f"#candidate-{letter} pre")
        if any(word in text.split() for word in CALM_WORDS):
            return letter
    raise AssertionError("no calm response on the page")


def log_in(page, base_url: str, token: str, lands_on: str) -> None:
    page.goto(base_url + "/login")
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("main button[type=submit]")
    assert page.url == base_url + lands_on, page.inner_text("main")


def test_annotator_labels_in_the_browser_and_the_export_trains_dpo(db_url, db, make_project, start_server, chromium,
                                                                   tiny_model_dir, tmp_path):
    from preftune import DPOConfig, train_dpo

    rows = make_toy_preferences(7, seed=3)
    rows[0]["prompt"] = XSS_PROMPT
    tokens = make_project(db, items=0, overlap=2, annotators=("ana", "ben"), admins=("lead",), guidelines=GUIDELINES,
                          project="kind-replies")
    from preftune.annotate.importer import ItemSpec, add_items, get_project

    with db.write() as session:
        add_items(session, get_project(session, "kind-replies"),
                  [ItemSpec(f"toy-{i}", r["prompt"], [r["chosen"], r["rejected"]][::1 - 2 * (i % 2)])
                   for i, r in enumerate(rows)], seed=1)
    server = start_server(db_url, "--log-level", "warning")
    screenshots = os.environ.get("PREFTUNE_SCREENSHOTS") == "1" and db_url.startswith("sqlite")

    context = chromium.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, server.url, tokens["ana"], "/")
    page.click("text=Start labelling")

    step = 0
    while page.locator("h1", has_text="All done").count() == 0:
        progress = int(page.get_attribute("#progress", "value"))
        assert progress == (step if step <= 1 else step - 1)  # every step but the skip (step 1) adds one
        prompt = page.inner_text(".prompt pre")
        if prompt == XSS_PROMPT:  # shown as text, never run
            assert page.evaluate("window.__pwned") is None
        good = calm_letter(page)
        if step == 0:  # mouse: choice, strength, a note, the Submit button
            page.click(f"label.choice-option:has(input[name=choice][value={good}])")
            page.click("label.choice-option:has(input[name=strength][value='2'])")
            page.fill("#note", "<b>calm</b> reads better")
            with page.expect_navigation():
                page.click("#submit")
        elif step == 1:  # keyboard: skip
            with page.expect_navigation():
                page.keyboard.press("s")
        elif step == 2:  # keyboard: choice, strength, Enter; the picked response is highlighted
            page.keyboard.press(good.lower())
            page.keyboard.press("3")
            assert "picked" in page.get_attribute(f"#candidate-{good}", "class")
            if screenshots:
                page.screenshot(path=str(ROOT / "docs/images/annotate-annotator.png"), full_page=True)
            with page.expect_navigation():
                page.keyboard.press("Enter")
        elif step == 3:  # keyboard: a tie, with a note typed after 'n'
            page.keyboard.press("t")
            page.keyboard.press("n")
            page.keyboard.type("both fine")
            with page.expect_navigation():
                page.keyboard.press("Control+Enter")
        else:  # arrows pick A / B
            page.keyboard.press("ArrowLeft" if good == "A" else "ArrowRight")
            with page.expect_navigation():
                page.keyboard.press("Enter")
        step += 1
    assert step == 7 and not errors
    assert "6 labelled, 1 skipped" in page.inner_text("main")
    page.goto(server.url + "/p/1/mine")
    mine = page.inner_text("table")
    assert "<b>calm</b> reads better" in mine and "tie" in mine  # the note is shown as text
    assert page.evaluate("document.querySelectorAll('table b').length") == 0

    # a second annotator over the JSON API (the calm one always wins), then the admin exports
    ben = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {tokens['ben']}"})
    item = ben.get("/api/projects/1/next").json()["item"]
    while item is not None:
        good = next(c["letter"] for c in item["candidates"] if any(w in c["text"].split() for w in CALM_WORDS))
        reply = ben.post(f"/api/projects/1/items/{item['item_id']}/label?next=true",
                         json={"choice": good, "request_id": f"ben-{item['item_id']}"})
        item = reply.json()["next"]
    assert ben.get("/admin").status_code == 403

    admin = chromium.new_context(viewport={"width": 1200, "height": 900})
    admin_page = admin.new_page()
    log_in(admin_page, server.url, tokens["lead"], "/admin")
    text = admin_page.inner_text("main")
    assert "Cohen's kappa" in text and "13 of 14 labels · 6 of 7 items complete" in text
    assert "ana" in text and "ben" in text
    if screenshots:
        admin_page.screenshot(path=str(ROOT / "docs/images/annotate-admin.png"), full_page=True)
    with admin_page.expect_download() as download:
        admin_page.click("text=pairs (ties dropped)")
    export = tmp_path / "pairs.jsonl"
    download.value.save_as(export)
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(exported) == 7  # the tie and the skip leave those items to ben alone
    assert all(any(w in r["chosen"].split() for w in CALM_WORDS) for r in exported)
    assert {r["vote_share"] for r in exported} == {1.0}
    assert all(0.5 < r["preference_prob"] <= 1.0 for r in exported)  # competence-weighted posterior
    context.close()
    admin.close()

    result = train_dpo(DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(export),
                                 output_dir=str(tmp_path / "run"), max_steps=3, per_device_batch_size=2,
                                 learning_rate=1e-4, max_length=64, logging_steps=1, warmup_ratio=0.0, seed=0))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert Path(result.model_dir, "config.json").is_file()
    assert sum("loss" in m for m in metrics) == 3


def test_ranking_and_rating_keys_in_the_browser(tmp_path, make_project, start_server, chromium):
    from sqlalchemy import select

    from preftune.annotate.db import Database
    from preftune.annotate.members import add_member
    from preftune.annotate.models import Assignment, Label

    url = f"sqlite:///{tmp_path / 'a.db'}"
    database = Database(url)
    database.upgrade()
    tokens = make_project(database, kind="ranking", items=1, candidates=3, project="rank", annotators=("ana",),
                          admins=())
    make_project(database, kind="rating", items=1, candidates=2, project="rate", annotators=(), admins=())
    with database.write() as session:
        add_member(session, "rate", "ana")
    server = start_server(url, "--log-level", "warning")
    page = chromium.new_context().new_page()
    log_in(page, server.url, tokens["ana"], "/")
    page.goto(server.url + "/p/1")
    for key in "cab":  # best first: C, then A, then B
        page.keyboard.press(key)
    assert [page.input_value(f"select[name=rank_{x}]") for x in "ABC"] == ["2", "3", "1"]
    assert "picked" in page.get_attribute("#candidate-C", "class")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    page.goto(server.url + "/p/2")
    page.keyboard.press("7")  # scores A, moves on to B
    page.keyboard.press("2")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    with database.read() as session:
        stored = {label.project_id: (label.answer, order) for label, order in session.execute(
            select(Label, Assignment.display_order).join(Assignment, Assignment.id == Label.assignment_id))}
    answer, order = stored[1]
    assert answer["ranking"] == [order[2], order[0], order[1]]
    answer, order = stored[2]
    assert answer["scores"][order[0]] == 7 and answer["scores"][order[1]] == 2
    database.dispose()


def test_binary_thumbs_with_mouse_and_keyboard_export_kto_and_train(tmp_path, make_project, start_server, chromium,
                                                                   tiny_model_dir):
    import subprocess
    import sys

    from preftune.annotate.db import Database
    from preftune.annotate.members import add_member
    from preftune.cli import main

    source = tmp_path / "items.jsonl"  # each pair becomes two binary items: the calm and the loud response
    source.write_text("".join(json.dumps(r) + "\n" for r in make_toy_preferences(3, seed=5)))
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert main(["annotate", "import", str(source), "--project", "thumbs", "--kind", "binary", "--db", url]) == 0
    database = Database(url)
    tokens = make_project(database, items=0, project="other", annotators=("ana",), admins=())
    with database.write() as session:
        add_member(session, "thumbs", "ana")
    database.dispose()
    server = start_server(url, "--log-level", "warning")
    page = chromium.new_context().new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    log_in(page, server.url, tokens["ana"], "/")
    page.goto(server.url + "/p/1")
    keys = [None, ("u", "d"), ("+", "-"), None, ("u", "d"), ("+", "-")]  # None: the mouse
    for step, pair in enumerate(keys):
        calm = any(word in page.inner_text("#candidate-A pre").split() for word in CALM_WORDS)
        thumb = "up" if calm else "down"
        if pair is None:
            page.click(f"#thumb-{thumb}")
            if step == 0:
                page.fill("#note", "calm and kind")
            with page.expect_navigation():
                page.click("#submit")
        else:
            page.keyboard.press(pair[0] if calm else pair[1])
            assert page.is_checked(f"input[name=thumb][value={thumb}]")
            with page.expect_navigation():
                page.keyboard.press("Enter")
    assert page.locator("h1", has_text="All done").count() == 1 and not errors

    export = tmp_path / "kto.jsonl"
    assert main(["annotate", "export", "--project", "thumbs", "--format", "kto", "--output", str(export),
                 "--db", url]) == 0
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(rows) == 6 and sum(r["label"] for r in rows) == 3
    assert all(r["label"] == any(w in r["completion"].split() for w in CALM_WORDS) for r in rows)
    assert all(r["vote_share"] == 1.0 and 0.5 < r["label_prob"] <= 1.0 for r in rows)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "preftune.cli", "kto", "--model_name_or_path", str(tiny_model_dir),
                           "--dataset", str(export), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
                           "--per_device_batch_size", "6", "--learning_rate", "1e-4", "--max_length", "64",
                           "--logging_steps", "1"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in m for m in losses) == 2
    model = tmp_path / "run" / "model"
    assert (model / "config.json").is_file() and any(model.glob("*.safetensors"))
