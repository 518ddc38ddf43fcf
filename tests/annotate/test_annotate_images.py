"""Images stored once (by digest) beside the items: what a page and the database hold, and the migration that
moves images stored inline by earlier versions out (upgrade) and back (downgrade), on each database."""

import base64
import hashlib
import json
import random

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, inspect, select, text

from preftune.annotate.app import create_app
from preftune.annotate.db import Database, alembic_config
from preftune.annotate.images import stored_image
from preftune.annotate.models import Base, Item, StoredImage


def noisy_png(path, side=1024, seed=0) -> bytes:
    """A picture PNG cannot compress (random pixels): about 3 MB at 1024 x 1024."""
    rng = random.Random(seed)
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(path)
    return path.read_bytes()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_items_sharing_an_image_store_it_once_and_their_pages_stay_small(db_url, db, make_project, tmp_path):
    from preftune.annotate.importer import add_items, get_project, read_items

    (tmp_path / "images").mkdir()
    noisy_png(tmp_path / "images" / "shared.png")
    rows = [{"id": f"pic-{n}", "prompt": f"What is in picture {n}?", "chosen": f"Noise {n}.",
             "rejected": f"A cat {n}.", "images": ["images/shared.png"]} for n in (1, 2)]
    rows.append({"id": "words", "prompt": "What is in no picture?", "chosen": "Nothing.", "rejected": "A dog."})
    tokens = make_project(db, items=0, annotators=("ana",), admins=("lead",), project="pics")
    with db.write() as session:
        assert add_items(session, get_project(session, "pics"), read_items(write_rows(tmp_path / "in.jsonl", rows)),
                         seed=1) == (3, 0)
    with db.write() as session:  # importing the same picture again (a new item) adds no copy either
        again = read_items(write_rows(tmp_path / "again.jsonl", [{**rows[0], "id": "pic-3"}]))
        assert add_items(session, get_project(session, "pics"), again, seed=2) == (1, 0)

    with db.read() as session:
        copies = session.scalar(select(func.count()).select_from(StoredImage))
        stored = session.scalar(select(StoredImage.data))
        metas = {i.external_id: i.meta for i in session.scalars(select(Item))}
    meta_sizes = {name: len(json.dumps(meta)) for name, meta in metas.items()}
    print(f"\nstored copies of the shared picture: {copies} ({len(stored):,} bytes); item meta sizes: {meta_sizes}")
    assert copies == 1 and len(stored) > 2_000_000     # one copy of a ~3 MB PNG for three items
    digest = hashlib.sha256(stored).hexdigest()
    assert {tuple(metas[f"pic-{n}"]["image_digests"]) for n in (1, 2, 3)} == {(digest,)}
    assert all(size < 400 for size in meta_sizes.values())  # digests and references only, never the bytes

    client = TestClient(create_app(db), headers={"authorization": f"Bearer {tokens['ana']}"})
    pages = {}
    while (served := client.get("/api/projects/1/next").json()["item"]) is not None:
        item_id = served["item_id"]
        page = client.get(f"/p/1/items/{item_id}")
        assert page.status_code == 200
        with db.read() as session:
            name = session.get(Item, item_id).external_id
        pages[name] = len(page.content)
        assert ("prompt-image" in page.text) == name.startswith("pic")
        if name.startswith("pic"):
            picture = client.get(f"/p/1/items/{item_id}/images/1")
            assert picture.status_code == 200 and picture.content == stored
            assert picture.headers["cache-control"] == "no-store"
            assert client.get(f"/p/1/items/{item_id}/images/2").status_code == 404
        answer = {"choice": "A", "request_id": f"r{item_id}"}
        assert client.post(f"/api/projects/1/items/{item_id}/label", json=answer).status_code == 201
    print(f"labelling page sizes (bytes): {pages}")
    assert set(pages) == {"pic-1", "pic-2", "pic-3", "words"}
    # an image item's page is the text page plus an <img> tag: no picture bytes inline
    assert all(pages[f"pic-{n}"] - pages["words"] < 300 for n in (1, 2, 3)) and pages["pic-1"] < 20_000


def old_item(item_id, meta):
    return {"id": item_id, "project_id": 1, "external_id": f"x{item_id}", "prompt": "p", "candidates": '["a", "b"]',
            "meta": json.dumps(meta), "random_key": 0.5, "created_at": 0}


def test_the_migration_moves_inline_images_out_and_back(db_url, tmp_path):
    pictures = [noisy_png(tmp_path / f"{n}.png", side=64, seed=n) for n in range(2)]
    inline = [base64.b64encode(p).decode("ascii") for p in pictures]
    metas = {1: {"images": ["a.png"], "image_data": [inline[0]], "topic": "cats"},
             2: {"images": ["a.png", "b.png"], "image_data": [inline[0], inline[1]]},  # shares a.png with item 1
             3: {"topic": "no images"}}
    database = Database(db_url)
    with database.engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0004")
    with database.write() as session:
        session.execute(text("INSERT INTO projects (id, name, kind, guidelines, overlap, allow_notes, created_at, "
                             "gold_rate) VALUES (1, 'old', 'pairwise', '', 1, true, 0, 0)"))
        for item_id, meta in metas.items():
            session.execute(text("INSERT INTO items (id, project_id, external_id, prompt, candidates, meta, "
                                 "random_key, created_at) VALUES (:id, :project_id, :external_id, :prompt, "
                                 ":candidates, :meta, :random_key, :created_at)"), old_item(item_id, meta))
    assert database.upgrade() == "0004"

    digests = [hashlib.sha256(p).hexdigest() for p in pictures]
    with database.read() as session:
        stored = dict(session.execute(select(StoredImage.digest, StoredImage.data)).all())
        items = {i.id: i for i in session.scalars(select(Item))}
        assert stored == dict(zip(digests, pictures))  # two pictures, each once
        assert items[1].meta == {"images": ["a.png"], "image_digests": [digests[0]], "topic": "cats"}
        assert items[2].meta == {"images": ["a.png", "b.png"], "image_digests": digests}
        assert items[3].meta == metas[3]
        assert stored_image(session, items[2], 2) == pictures[1] and stored_image(session, items[2], 3) is None
    with database.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []

    with database.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0004")
    with database.read() as session:
        assert {item_id: json.loads(meta) if isinstance(meta, str) else meta for item_id, meta in
                session.execute(text("SELECT id, meta FROM items ORDER BY id")).all()} == metas
    with database.engine.connect() as connection:
        assert "images" not in inspect(connection).get_table_names()
    assert database.upgrade() == "0004"  # and up again
    with database.read() as session:
        assert session.scalar(select(func.count()).select_from(StoredImage)) == 2
    database.dispose()
