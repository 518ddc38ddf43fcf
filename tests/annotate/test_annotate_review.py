"""The findings of the second security and reliability review, one test each: login rate limits that cannot
be spoofed through loopback headers, that cannot lock out a valid token, and that cost O(1) per request;
markup and control characters in names; removed members; image paths, decompression bombs and caching;
file modes of databases and exports; gold items never shown as gold; adjudication beside the labels."""

from __future__ import annotations

import json
import os
import re
import stat
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import select  # noqa: E402

from preftune.annotate.app import ServerSettings, create_app  # noqa: E402
from preftune.annotate.security import LoginLimiter, TooManyAttempts  # noqa: E402
from preftune.cli import main  # noqa: E402


def login_nonce(client) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)


def bad_login(client, headers=None):
    return client.post("/login", data={"token": "pt-wrong", "csrf_token": login_nonce(client)}, headers=headers or {},
                       follow_redirects=False)


def test_forwarded_headers_through_loopback_do_not_choose_the_address(start_server, tmp_path, make_project):
    from preftune.annotate.db import Database

    url = f"sqlite:///{tmp_path / 'a.db'}"
    db = Database(url)
    db.upgrade()
    make_project(db)
    db.dispose()
    server = start_server(url)
    with httpx.Client(base_url=server.url) as client:
        codes = [bad_login(client, {"x-forwarded-for": f"10.0.{i}.1", "forwarded": f"for=10.1.{i}.1"}).status_code
                 for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]   # one bucket: the real peer, 127.0.0.1


def test_serve_trusts_proxy_headers_only_from_the_proxies_named(monkeypatch, tmp_path):
    import uvicorn

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.append(kwargs))
    db = str(tmp_path / "a.db")
    assert main(["annotate", "serve", "--db", db]) == 0
    assert main(["annotate", "serve", "--db", db, "--trusted_proxies", "127.0.0.1, 10.0.0.2"]) == 0
    assert (seen[0]["proxy_headers"], seen[0]["forwarded_allow_ips"]) == (False, None)
    assert (seen[1]["proxy_headers"], seen[1]["forwarded_allow_ips"]) == (True, "127.0.0.1,10.0.0.2")


def test_failed_logins_from_an_address_never_lock_out_a_valid_token(db, make_project):
    tokens = make_project(db)
    client = TestClient(create_app(db, ServerSettings(login_attempts=3)))
    assert [bad_login(client).status_code for _ in range(5)] == [401, 401, 401, 429, 429]
    good = client.post("/login", data={"token": tokens["alice"], "csrf_token": login_nonce(client)},
                       follow_redirects=False)
    assert good.status_code == 303 and good.headers["location"] == "/"
    assert bad_login(client).status_code == 429   # the guesser is still limited


def test_the_login_limiter_costs_o1_per_failure_however_many_addresses(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    limiter = LoginLimiter(attempts=3, window=300.0)
    for i in range(60_000):
        limiter.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(limiter.failures) == 60_000
    started = time.perf_counter()
    for i in range(20_000):   # the old limiter scanned every address on each of these: 1.2e9 steps
        limiter.failed(f"2001:db8::{i:x}")
    assert time.perf_counter() - started < 2.0
    clock[0] += 301   # everything is stale now: each failure drops two stale addresses
    for i in range(10):
        limiter.failed("192.0.2.1")
    assert len(limiter.failures) == 80_000 + 1 - 20
    for _ in range(3):
        limiter.failed("192.0.2.2")
    with pytest.raises(TooManyAttempts):
        limiter.check("192.0.2.2")
    clock[0] += 301
    limiter.check("192.0.2.2")   # the window passed


@pytest.mark.parametrize("name", ["[/oops]", "[bold]x", "evil\x1b[2Jname\x07"])
def test_names_with_markup_or_control_characters_print_as_text(tmp_path, capsys, name):
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "responses": ["a", "b"]}) + "\n")
    db = str(tmp_path / "a.db")
    assert main(["annotate", "import", str(data), "--db", db, "--project", name]) == 0
    assert main(["annotate", "stats", "--db", db, "--project", name]) == 0
    assert main(["annotate", "project", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "\x1b[2J" not in out and "\x07" not in out
    if "\x1b" not in name:
        assert name in out


def test_a_removed_member_cannot_read_their_labels(db, make_project):
    from preftune.annotate.members import remove_member

    tokens = make_project(db)
    alice = TestClient(create_app(db), headers={"authorization": f"Bearer {tokens['alice']}"})
    item = alice.get("/api/projects/1/next").json()["item"]
    label = alice.post(f"/api/projects/1/items/{item['item_id']}/label", json={"choice": "A", "request_id": "r1"})
    label_id = label.json()["label_id"]
    assert alice.get(f"/api/labels/{label_id}").status_code == 200
    with db.write() as session:
        remove_member(session, "demo", "alice")
    assert alice.get(f"/api/labels/{label_id}").status_code == 404
    assert alice.get("/api/projects/1/labels").status_code == 404


def png(path, size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


@pytest.mark.parametrize("reference", ["../outside.png", "/abs/red.png", "link/red.png", "~/red.png"])
def test_image_import_stays_beside_its_file(tmp_path, reference):
    from preftune.annotate.importer import read_items
    from preftune.errors import DataError

    folder = tmp_path / "data"
    (folder / "real").mkdir(parents=True)
    png(tmp_path / "outside.png")
    png(folder / "real" / "red.png")
    (folder / "link").symlink_to(folder / "real")
    if reference.startswith("/abs"):
        reference = str(folder / "real" / "red.png")
    source = folder / "items.jsonl"
    source.write_text(json.dumps({"prompt": "Which?", "responses": ["a", "b"], "images": [reference]}) + "\n")
    with pytest.raises(DataError, match="relative|symbolic link"):
        read_items(str(source))
    source.write_text(json.dumps({"prompt": "Which?", "responses": ["a", "b"], "images": ["real/red.png"]}) + "\n")
    assert read_items(str(source))[0].meta["images"] == ["real/red.png"]   # kept as given, not made absolute


def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    from preftune.annotate import images
    from preftune.annotate.importer import read_items
    from preftune.errors import DataError

    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    png(tmp_path / "big.png", (200, 100))
    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps({"prompt": "Which?", "responses": ["a", "b"], "images": ["big.png"]}) + "\n")
    with pytest.raises(DataError, match="200x100 pixels"):
        read_items(str(source))


def test_images_are_never_cached(db, make_project, tmp_path):
    from preftune.annotate.importer import add_items, get_project, read_items

    png(tmp_path / "red.png")
    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps({"prompt": "Which?", "responses": ["a", "b"], "images": ["red.png"]}) + "\n")
    tokens = make_project(db, items=0)
    with db.write() as session:
        add_items(session, get_project(session, "demo"), read_items(str(source)))
    alice = TestClient(create_app(db), headers={"authorization": f"Bearer {tokens['alice']}"})
    item = alice.get("/api/projects/1/next").json()["item"]
    image = alice.get(f"/p/1/items/{item['item_id']}/images/1")
    assert image.status_code == 200 and image.headers["cache-control"] == "no-store"


def test_existing_database_files_and_exports_are_private(tmp_path, capsys):
    db = tmp_path / "old.db"
    db.touch(mode=0o644)
    os.chmod(db, 0o644)
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "responses": ["a", "b"]}) + "\n")
    old = os.umask(0o022)
    try:
        assert main(["annotate", "import", str(data), "--db", str(db), "--project", "p"]) == 0
        assert main(["annotate", "export", "--db", str(db), "--project", "p", "--output", str(tmp_path / "x.jsonl"),
                     "--raw"]) == 0
    finally:
        os.umask(old)
    for path in (db, tmp_path / "x.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_gold_items_are_served_at_the_rate_unmarked_and_scored(db, make_project):
    from preftune.annotate import queue
    from preftune.annotate.importer import ItemSpec, add_items, ensure_project

    tokens = make_project(db, items=20, overlap=1)
    with db.write() as session:
        project, _ = ensure_project(session, "demo", gold_rate=0.5)
        add_items(session, project, [ItemSpec(f"gold-{i}", f"Gold prompt {i}", ["good", "bad"], gold=0)
                                     for i in range(4)])
    alice = TestClient(create_app(db), headers={"authorization": f"Bearer {tokens['alice']}"})
    served = []
    item = alice.get("/api/projects/1/next").json()["item"]
    while item is not None:
        # nothing says gold
        assert set(item) == {"project_id", "item_id", "kind", "prompt", "candidates", "allow_notes"}
        served.append(item["prompt"])
        right = "AB"[[c["text"] for c in item["candidates"]].index("good")] if item["prompt"].startswith("Gold") \
            else "A"
        reply = alice.post(f"/api/projects/1/items/{item['item_id']}/label?next=true",
                           json={"choice": right, "request_id": f"r{item['item_id']}"})
        assert reply.status_code == 201
        item = reply.json()["next"]
    assert sum(p.startswith("Gold") for p in served) == 4 and len(served) == 24
    page = TestClient(create_app(db), headers={"authorization": f"Bearer {tokens['alice']}"})
    assert "gold" not in page.get("/p/1").text.lower()
    boss = TestClient(create_app(db), headers={"authorization": f"Bearer {tokens['boss']}"})
    report = boss.get("/admin/p/1/stats.json").json()
    alice_stats = next(s for s in report["stats"] if s["annotator"] == "alice")
    assert alice_stats["gold_accuracy"] == 1.0 and alice_stats["gold_compared"] == 4
    assert report["progress"]["items"] == 20 and report["progress"]["gold_items"] == 4
    with db.read() as session:
        assert queue.available_count(session, project, 1) == 0


def test_disputed_items_are_adjudicated_beside_the_labels(db, make_project, tmp_path):
    from preftune.annotate.models import Adjudication, Label

    tokens = make_project(db, items=2, overlap=2)
    clients = {n: TestClient(create_app(db), headers={"authorization": f"Bearer {tokens[n]}"})
               for n in ("alice", "bob", "boss")}
    for name, prefer in (("alice", 0), ("bob", 1)):   # they disagree on both items
        item = clients[name].get("/api/projects/1/next").json()["item"]
        while item is not None:
            texts = [c["text"] for c in item["candidates"]]
            choice = "AB"[next(k for k, t in enumerate(texts) if t.endswith(f".{prefer}"))]
            reply = clients[name].post(f"/api/projects/1/items/{item['item_id']}/label?next=true",
                                       json={"choice": choice, "request_id": f"{name}{item['item_id']}"})
            item = reply.json()["next"]
    boss = clients["boss"]
    disputes = boss.get("/admin/p/1/disputes.json").json()
    assert len(disputes) == 2 and all(d["agreement"] == 0.5 and not d["adjudicated"] for d in disputes)
    assert "Resolve" in boss.get("/admin/p/1/disputes").text
    assert boss.get("/admin/p/1/export.jsonl").text == ""   # evenly split, equally competent: no pair
    reply = boss.post(f"/admin/p/1/items/{disputes[0]['item_id']}/adjudicate", json={"choice": "B"})
    assert reply.status_code == 200
    assert alice_cannot_adjudicate(clients["alice"], disputes[0]["item_id"])
    rows = {r["item"]: r for r in map(json.loads, boss.get("/admin/p/1/export.jsonl").text.splitlines())}
    resolved = rows.pop(disputes[0]["external_id"])
    assert resolved["chosen"].endswith(".1") and resolved["preference_prob"] == 1.0 and resolved["vote_share"] == 0.5
    # the resolution anchors the competences: bob agreed with it, so the other split item now leans his way
    (other,) = rows.values()
    assert other["chosen"].endswith(".1") and 0.5 < other["preference_prob"] < 1.0
    with db.read() as session:
        assert session.scalar(select(Adjudication.answer)) == {"winner": 1, "strength": None}
        assert len(session.scalars(select(Label)).all()) == 4   # the labels are untouched
    assert boss.get("/admin/p/1/disputes.json").json()[-1]["adjudicated"] is True


def alice_cannot_adjudicate(client, item_id) -> bool:
    return client.post(f"/admin/p/1/items/{item_id}/adjudicate", json={"choice": "A"}).status_code == 403
