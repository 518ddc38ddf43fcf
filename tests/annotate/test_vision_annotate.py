"""Image prompts in the annotation server: imported with the item, shown on the labelling page in a real
browser, served only to who may see them, and kept as references in the export (which then trains)."""

import httpx
import pytest

from helpers import write_jsonl
from preftune.data import TokenizeSettings, load_records
from preftune.errors import DataError
from preftune.multimodal.data import tokenize_vision_pairs
from toyvision import build_vision_processor, make_colour_pairs


def colour_items(tmp_path, n=3):
    return [{**r, "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]}
            for r in make_colour_pairs(n, tmp_path / "images", seed=7)]   # candidates are texts


def import_colour_items(db, make_project, tmp_path, n=3):
    from preftune.annotate.importer import add_items, get_project, read_items

    rows = colour_items(tmp_path, n)
    rows[0]["prompt"][0]["content"][1]["text"] = "<script>window.__pwned = 1</script> What colour?"
    source = write_jsonl(tmp_path / "items.jsonl", rows)
    tokens = make_project(db, items=0, annotators=("ana", "ben"), admins=("lead",), project="colours")
    with db.write() as session:
        add_items(session, get_project(session, "colours"), read_items(str(source)), seed=1)
    return tokens, rows


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_labelling_page_shows_the_image_prompt(db_url, db, make_project, start_server, chromium, tmp_path):
    tokens, rows = import_colour_items(db, make_project, tmp_path)
    server = start_server(db_url, "--log-level", "warning")
    context = chromium.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: errors.append(f"{message.text} {message.location}")
            if message.type == "error" and "favicon" not in str(message.location) else None)
    page.goto(server.url + "/login")
    page.fill("#token", tokens["ana"])
    with page.expect_navigation():
        page.click("main button[type=submit]")
    page.goto(server.url + "/p/1")
    image = page.locator("img.prompt-image")
    assert image.count() == 1
    image.wait_for()
    for _ in range(200):   # polled from here: the page's script-src 'self' policy refuses in-page eval (rightly)
        if page.evaluate("document.querySelector('img.prompt-image').complete"):
            break
        page.wait_for_timeout(50)
    size = page.evaluate("[document.querySelector('img.prompt-image').naturalWidth, "
                         "document.querySelector('img.prompt-image').naturalHeight]")
    assert size == [28, 28]                     # loaded through the page's img-src 'self' policy
    pixel = page.evaluate("""() => { const img = document.querySelector('img.prompt-image');
        const c = document.createElement('canvas'); c.width = 28; c.height = 28;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, 28, 28).data; let s = [0, 0, 0];
        for (let i = 0; i < d.length; i += 4) { s[0] += d[i]; s[1] += d[i + 1]; s[2] += d[i + 2]; }
        return s.map(v => v / 784); }""")
    prompt = page.inner_text(".prompt pre")
    colour = next(r["chosen"].split()[-1].rstrip(".") for r in rows
                  if r["prompt"][0]["content"][1]["text"] in prompt)
    dominant = ["red", "green", "blue"][max(range(3), key=lambda k: pixel[k])]
    assert colour == dominant or (colour == "yellow" and min(pixel[:2]) > 150)   # the right image is shown
    assert page.evaluate("window.__pwned") is None and not errors
    src = image.get_attribute("src")
    context.close()

    # Only who was served the item (or an admin) gets its image; everyone else a 404, nobody a 500.
    item_id = int(src.split("/items/")[1].split("/")[0])
    ana = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {tokens['ana']}"})
    ben = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {tokens['ben']}"})
    lead = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {tokens['lead']}"})
    shown = ana.get(src)
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    assert shown.headers["x-content-type-options"] == "nosniff" and shown.content.startswith(b"\x89PNG")
    assert ben.get(src).status_code == 404
    assert lead.get(src).status_code == 200
    for bad in (src[:-1] + "2", src[:-1] + "0", f"/p/1/items/{item_id + 100}/images/1", "/p/9/items/1/images/1"):
        assert lead.get(bad).status_code == 404, bad
    assert httpx.get(server.url + src).status_code in (303, 401)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_export_keeps_the_image_references_and_trains(db_url, db, make_project, tmp_path):
    from preftune.annotate import queue
    from preftune.annotate.aggregate import export_pairs
    from preftune.annotate.importer import get_project
    from preftune.annotate.tokens import find_annotator

    tokens, rows = import_colour_items(db, make_project, tmp_path)
    with db.read() as session:
        project = get_project(session, "colours")
        ana = find_annotator(session, tokens["ana"]).id
    while (served := queue.next_item(db, project, ana)) is not None:
        queue.submit(db, project, ana, served.item.id, {"choice": "A"}, None, f"r{served.item.id}")
    with db.read() as session:
        exported = export_pairs(session, project)
    assert len(exported) == 3
    images = {r["images"][0] for r in rows}
    assert {r["images"][0] for r in exported} == images  # as given: relative to the file, never made absolute
    pairs, _ = tokenize_vision_pairs(load_records(str(write_jsonl(tmp_path / "export.jsonl", exported))),
                                     build_vision_processor("llava"), TokenizeSettings(max_length=128))
    assert len(pairs) == 3 and all(p.prompt.image_inputs["pixel_values"].shape == (1, 3, 28, 28) for p in pairs)


def test_an_import_row_with_a_missing_image_names_the_row(tmp_path):
    from preftune.annotate.importer import read_items

    rows = colour_items(tmp_path)
    rows[2]["images"] = ["images/gone.png"]
    source = write_jsonl(tmp_path / "items.jsonl", rows)
    with pytest.raises(DataError) as caught:
        read_items(str(source))
    assert caught.value.row == 3 and caught.value.field == "images" and "file not found" in str(caught.value)
