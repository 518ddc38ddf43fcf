"""Bugs found by a security and reliability probe, each on SQLite and PostgreSQL: sessions, no 500s on
malformed input, at most ``overlap`` labels per item, download names, numeric options, file modes,
project membership and login rate limits."""

import json
import os
import re
import stat
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from preftune.annotate import queue
from preftune.annotate.app import ServerSettings, create_app
from preftune.annotate.importer import get_project
from preftune.annotate.models import Assignment, Label, LoginSession
from preftune.annotate.sessions import hash_secret
from preftune.annotate.tokens import revoke, rotate_token
from preftune.cli import main

HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")


@pytest.fixture()
def site(db, make_project):
    tokens = make_project(db, items=3, overlap=1)
    return create_app(db, ServerSettings(max_body=20_000)), tokens


def api(app, token):
    return TestClient(app, headers={"authorization": f"Bearer {token}"})


def login_form(client) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)


def browser_login(app, token, secure=False) -> TestClient:
    client = TestClient(app, base_url="https://testserver" if secure else "http://testserver")
    response = client.post("/login", data={"token": token, "csrf_token": login_form(client)}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return client


def csrf_of(client) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)


# bug 2: the session cookie was the permanent API token


def test_the_session_cookie_is_a_random_id_stored_hashed_and_rotated_at_login(site):
    app, tokens = site
    client = browser_login(app, tokens["alice"])
    session_id = client.cookies["preftune_session"]
    assert session_id.startswith("ps_") and tokens["alice"] not in session_id
    with app.state.db.read() as session:
        stored = session.scalars(select(LoginSession.id_hash)).all()
    assert stored == [hash_secret(session_id)]
    assert client.get("/p/1", follow_redirects=False).status_code == 200
    # logging in again (even from the same browser) gives a new id and ends the old session
    again = client.post("/login", data={"token": tokens["alice"], "csrf_token": login_form(client)},
                        follow_redirects=False)
    assert again.status_code == 303 and client.cookies["preftune_session"] != session_id
    replay = TestClient(app, cookies={"preftune_session": session_id})
    assert replay.get("/p/1", follow_redirects=False).headers["location"] == "/login"
    assert TestClient(app, cookies={"preftune_session": tokens["alice"]}).get("/api/projects").status_code == 401


def test_logout_and_token_revocation_end_sessions_and_sessions_expire(site):
    app, tokens = site
    client = browser_login(app, tokens["alice"])
    session_id = client.cookies["preftune_session"]
    assert client.post("/logout", data={"csrf_token": csrf_of(client)}, follow_redirects=False).status_code == 303
    replay = TestClient(app, cookies={"preftune_session": session_id})
    assert replay.get("/api/projects").status_code == 401  # a replayed cookie no longer works
    for end in (revoke, rotate_token):
        client = browser_login(app, tokens["alice"])
        assert client.get("/api/projects").status_code == 200
        with app.state.db.write() as session:
            tokens["alice"] = end(session, "alice") or tokens["alice"]
        assert client.get("/api/projects").status_code == 401
        with app.state.db.write() as session:
            tokens["alice"] = rotate_token(session, "alice")  # active again, with a new token
    client = browser_login(app, tokens["alice"])
    with app.state.db.write() as session:
        session.execute(update(LoginSession).values(expires_at=time.time() - 1))
    assert client.get("/api/projects").status_code == 401


def test_over_https_the_cookies_are_host_prefixed_and_secure(db, make_project):
    tokens = make_project(db, items=1)
    app = create_app(db, ServerSettings(secure_cookies=True))
    client = TestClient(app, base_url="https://testserver")
    page = client.get("/login")
    assert "__Host-preftune_login=" in page.headers["set-cookie"]
    nonce = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    response = client.post("/login", data={"token": tokens["alice"], "csrf_token": nonce}, follow_redirects=False)
    cookie = [c for c in response.headers.get_list("set-cookie") if c.startswith("__Host-preftune_session=")][0]
    assert "Secure" in cookie and "Path=/" in cookie and "Domain" not in cookie and "HttpOnly" in cookie
    assert client.get("/api/projects").status_code == 200
    # a cookie without the prefix (another service on the host could set it) is not looked at
    plain = TestClient(app, base_url="https://testserver",
                       cookies={"preftune_session": client.cookies["__Host-preftune_session"]})
    assert plain.get("/api/projects").status_code == 401


# bug 3: hmac.compare_digest raised on non-ASCII text and uploads


def test_non_ascii_and_uploaded_csrf_tokens_are_refused_with_403(site):
    app, tokens = site
    anonymous = TestClient(app)
    login_form(anonymous)
    for data, files in (({"token": tokens["alice"], "csrf_token": "é"}, None),
                        ({"token": tokens["alice"]}, {"csrf_token": ("x.txt", b"abc")}),
                        ({"csrf_token": "x"}, {"token": ("t.txt", tokens["alice"].encode())})):
        response = anonymous.post("/login", data=data, files=files)
        assert response.status_code == 403 and "expired" in response.text
    client = browser_login(app, tokens["alice"])
    page = client.get("/p/1").text
    item_id = int(re.search(r'action="/p/1/items/(\d+)"', page).group(1))
    for data, files in (({"csrf_token": "é", "choice": "A"}, None), ({"choice": "A"}, {"csrf_token": ("f", b"x")})):
        assert client.post(f"/p/1/items/{item_id}", data=data, files=files).status_code == 403
        assert client.post("/logout", data=data, files=files).status_code == 403
    for header in ("é".encode(), "é".encode("latin-1"), b"\xff\xfe"):
        response = client.post(f"/api/projects/1/items/{item_id}/label", headers={"x-csrf-token": header},
                               json={"choice": "A", "request_id": "r"})
        assert response.status_code == 403
    with app.state.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Label)) == 0


# bug 4: more labels than the overlap


def test_a_skipped_item_cannot_be_labelled_afterwards(site):
    app, tokens = site
    alice, bob = api(app, tokens["alice"]), api(app, tokens["bob"])
    item = alice.get("/api/projects/1/next").json()["item"]["item_id"]
    assert alice.post(f"/api/projects/1/items/{item}/skip").status_code == 200
    late = alice.post(f"/api/projects/1/items/{item}/label", json={"choice": "A", "request_id": "late"})
    assert late.status_code == 409 and "skipped" in late.json()["detail"]
    served = [bob.get("/api/projects/1/next").json()["item"]["item_id"]]
    assert served == [item]  # the skipped item went to someone else
    assert bob.post(f"/api/projects/1/items/{item}/label", json={"choice": "B", "request_id": "b"}).status_code == 201
    with app.state.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Label).where(Label.item_id == item)) == 1


def _expire_leases(db):
    with db.write() as session:
        session.execute(update(Assignment).where(Assignment.status == "open").values(served_at=0.0))


def test_a_late_label_is_taken_only_while_a_place_is_free(db, make_project):
    make_project(db, items=1, overlap=1, annotators=("a", "b", "c"), admins=())
    app = create_app(db)
    with db.read() as session:
        proj = get_project(session, "demo")
    people = {}
    for name in ("a", "b", "c"):
        with db.write() as session:
            people[name] = api(app, rotate_token(session, name))
    item = people["a"].get("/api/projects/1/next").json()["item"]["item_id"]
    _expire_leases(db)  # a walked away: the item goes to b
    assert people["b"].get("/api/projects/1/next").json()["item"]["item_id"] == item
    # a comes back while the place is still free: a's answer is taken, b's later one is not
    assert people["a"].post(f"/api/projects/1/items/{item}/label",
                            json={"choice": "A", "request_id": "a1"}).status_code == 201
    refused = people["b"].post(f"/api/projects/1/items/{item}/label", json={"choice": "B", "request_id": "b1"})
    assert refused.status_code == 409 and "all the labels it needs" in refused.json()["detail"]
    assert people["b"].get("/api/projects/1/next").json()["item"] is None  # not served again once complete
    assert people["c"].get("/api/projects/1/next").json()["item"] is None
    # the form shows the same message on its page
    with db.write() as session:
        token = rotate_token(session, "b")
    browser = TestClient(app)
    browser.post("/login", data={"token": token, "csrf_token": login_form(browser)})
    page = browser.post(f"/p/1/items/{item}", data={"csrf_token": csrf_of(browser), "choice": "B", "action": "submit"})
    assert page.status_code == 409 and "all the labels it needs" in page.text
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Label)) == 1
        exported = queue.project_progress(session, proj)
    assert exported["labels"] == 1 and exported["complete_items"] == 1


def test_retries_and_expired_leases_in_any_order_never_exceed_the_overlap(db, make_project):
    from preftune.annotate.models import Annotator

    make_project(db, items=3, overlap=2, annotators=[f"r{i}" for i in range(8)], admins=())
    with db.read() as session:
        proj = get_project(session, "demo")
        ids = {a.name: a.id for a in session.scalars(select(Annotator))}
    served = {name: set() for name in ids}
    for _ in range(3):  # everyone takes an item, leases run out, others take the same items
        for name, annotator in ids.items():
            got = queue.next_item(db, proj, annotator)
            if got is not None:
                served[name].add(got.item.id)
                if len(served[name]) == 1 and name in ("r0", "r1"):  # two of them skip their first item
                    queue.skip(db, proj, annotator, got.item.id)
        _expire_leases(db)
    assert sum(len(items) for items in served.values()) > 3 * 2  # more people were served than places exist
    outcomes = []
    for name, items in sorted(served.items(), reverse=True):  # now everyone answers all they were served
        for item_id in sorted(items):
            for _ in range(2):  # and sends it twice
                try:
                    outcome = queue.submit(db, proj, ids[name], item_id, {"choice": "A"}, "", f"{name}-{item_id}")
                    outcomes.append(outcome.outcome)
                except queue.RequestConflict:
                    outcomes.append("refused")
    with db.read() as session:
        per_item = dict(session.execute(select(Label.item_id, func.count()).group_by(Label.item_id)).all())
    assert per_item == {1: 2, 2: 2, 3: 2}  # every place filled, none twice
    assert outcomes.count("created") == 6 and outcomes.count("duplicate") == 6 and "refused" in outcomes


# bug 5: non-Latin-1 project names in the download header


@pytest.mark.parametrize("name", ["проект", "日本語", 'quote"and;semi'])
def test_downloads_of_any_project_name_use_rfc_5987_filenames(db, make_project, name):
    tokens = make_project(db, items=1, project=name)
    boss = api(create_app(db), tokens["boss"])
    for url in ("/admin/p/1/export.jsonl", "/admin/p/1/labels.jsonl"):
        response = boss.get(url)
        assert response.status_code == 200
        disposition = response.headers["content-disposition"]
        assert disposition.isascii() and disposition.startswith('attachment; filename="')
        encoded = re.search(r"filename\*=UTF-8''(\S+)", disposition).group(1)
        from urllib.parse import unquote

        assert unquote(encoded).startswith(name.replace('"', "-").replace(";", "-"))


# bug 6: NUL bytes and lone surrogates


def test_nul_and_lone_surrogates_in_notes_and_request_ids_are_422_and_the_answer_can_be_resent(site):
    app, tokens = site
    alice = api(app, tokens["alice"])
    item = alice.get("/api/projects/1/next").json()["item"]["item_id"]
    url = f"/api/projects/1/items/{item}/label"
    for body, field in (('{"choice": "A", "request_id": "r", "note": "a\\u0000b"}', "note"),
                        ('{"choice": "A", "request_id": "r", "note": "\\ud800"}', "note"),
                        ('{"choice": "A", "request_id": "r\\u0000"}', "request_id"),
                        ('{"choice": "A", "request_id": "\\udfff"}', "request_id")):
        response = alice.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422 and response.json()["detail"].startswith(field), body
    client = browser_login(app, tokens["bob"])
    page = client.get("/p/1").text
    bob_item = int(re.search(r'action="/p/1/items/(\d+)"', page).group(1))
    form = {"csrf_token": csrf_of(client), "choice": "A", "action": "submit"}
    refused = client.post(f"/p/1/items/{bob_item}", data={**form, "note": "nul \x00 here"})
    assert refused.status_code == 422 and "NUL" in refused.text and "nul" in refused.text  # the note is kept
    assert alice.post(url, json={"choice": "A", "request_id": "r", "note": "fine"}).status_code == 201
    with app.state.db.read() as session:
        assert session.scalars(select(Label.note)).all() == ["fine"]


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800"])
def test_an_import_with_nul_or_a_lone_surrogate_exits_2_naming_the_row(db_url, tmp_path, capsys, bad):
    path = tmp_path / "items.jsonl"
    rows = [{"prompt": "fine", "responses": ["x", "y"]}, {"prompt": "p", "responses": ["ok", f"bad {bad}"]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = main(["annotate", "import", str(path), "--project", "p", "--db", db_url])
    err = capsys.readouterr().err
    assert code == 2 and "row 2" in err and "responses[1]" in err and "Traceback" not in err


# bug 7: deep JSON, huge ids, headers on 500s


def test_deep_json_and_huge_ids_are_4xx(site):
    app, tokens = site
    alice = api(app, tokens["alice"])
    item = alice.get("/api/projects/1/next").json()["item"]["item_id"]
    for depth in (50, 900, 1000, 9000):
        body = '{"choice": "A", "request_id": "r", "ranking": ' + "[" * depth + "]" * depth + "}"
        response = alice.post(f"/api/projects/1/items/{item}/label", content=body,
                              headers={"content-type": "application/json"})
        assert response.status_code == 422 and "nested" in response.json()["detail"], depth
    for huge in (2**31, 2**63, 2**64, 10**30):
        for url in (f"/api/projects/{huge}/next", f"/api/projects/1/items/{huge}/skip", f"/api/labels/{huge}"):
            method = alice.post if url.endswith("skip") else alice.get
            assert method(url).status_code == 422, url
    assert alice.get(f"/api/projects/1/items/{2**31 - 1}/skip").status_code == 405


def test_a_crash_is_a_plain_500_with_the_security_headers(site, monkeypatch):
    app, tokens = site

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(queue, "next_item", broken)
    response = TestClient(app, raise_server_exceptions=False,
                          headers={"authorization": f"Bearer {tokens['alice']}"}).get("/api/projects/1/next")
    assert response.status_code == 500 and "a bug" not in response.text
    assert all(name in response.headers for name in HEADERS)


# bug 8: numeric options, rate limits, file modes, membership


def test_margin_scale_and_min_votes_must_be_sensible(site, tmp_path, capsys):
    app, tokens = site
    boss = api(app, tokens["boss"])
    for query in ("margin_scale=inf", "margin_scale=nan", "margin_scale=-1", "margin_scale=1e400",
                  "min_votes=0", f"min_votes={2**64}", "ties=maybe"):
        response = boss.get(f"/admin/p/1/export.jsonl?{query}")
        assert response.status_code == 422, query
    assert boss.get("/admin/p/1/export.jsonl?margin_scale=2.5").status_code == 200
    code = main(["annotate", "export", "--project", "demo", "--output", str(tmp_path / "o.jsonl"),
                 "--margin-scale", "inf", "--db", app.state.db.url.replace("postgresql+psycopg", "postgresql")])
    assert code == 2 and "margin_scale" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_failed_logins_are_limited_per_address(db, make_project):
    make_project(db, items=1)
    app = create_app(db, ServerSettings(login_attempts=3, login_window=60))
    client = TestClient(app)
    for _ in range(3):
        assert client.post("/login", data={"token": "pt_wrong", "csrf_token": login_form(client)}).status_code == 401
    limited = client.post("/login", data={"token": "pt_wrong", "csrf_token": login_form(client)})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert "too many failed logins" in limited.text
    # a valid token is never locked out (test_annotate_review.py); another address is not affected
    other = TestClient(app, client=("10.0.0.2", 5000))
    assert other.post("/login", data={"token": "pt_wrong", "csrf_token": login_form(other)}).status_code == 401


def test_sqlite_database_files_and_backups_are_private(tmp_path):  # PostgreSQL keeps its own files
    from preftune.annotate.db import Database, backup_sqlite

    old = os.umask(0o022)
    try:
        database = Database(str(tmp_path / "a.db"))
        database.upgrade()
        path = database.engine.url.database
        files = [path, path + "-wal", path + "-shm", str(backup_sqlite(path, "test"))]
    finally:
        os.umask(old)
    for name in files:
        assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
    database.dispose()


def test_annotators_see_and_label_only_projects_they_belong_to(db_url, db, make_project, capsys):
    tokens = make_project(db, items=2, project="open", annotators=("alice",), admins=("boss",))
    make_project(db, items=2, project="closed", annotators=("carol",), admins=())
    app = create_app(db)
    alice, boss = api(app, tokens["alice"]), api(app, tokens["boss"])
    assert [p["name"] for p in alice.get("/api/projects").json()] == ["open"]
    assert sorted(p["name"] for p in boss.get("/api/projects").json()) == ["closed", "open"]
    for url in ("/api/projects/2/next", "/api/projects/2/labels"):
        assert alice.get(url).status_code == 404
    browser = browser_login(app, tokens["alice"])
    assert "closed" not in browser.get("/").text and browser.get("/p/2").status_code == 404
    url = db_url.replace("postgresql+psycopg", "postgresql")
    assert main(["annotate", "member", "add", "closed", "alice", "--db", url]) == 0
    assert alice.get("/api/projects/2/next").json()["item"] is not None
    assert main(["annotate", "member", "list", "closed", "--db", url]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["alice", "carol"]
    assert main(["annotate", "member", "remove", "closed", "alice", "--db", url]) == 0
    assert alice.get("/api/projects/2/next").status_code == 404
    assert main(["annotate", "member", "add", "closed", "nobody", "--db", url]) == 2
    assert "no annotator named 'nobody'" in capsys.readouterr().err


def test_the_quick_queue_count_equals_counting_the_queue_query(db, make_project):
    """``available_count`` (what progress bars show; cheap on large projects) == count(ELIGIBLE)."""
    from preftune.annotate.models import Annotator

    make_project(db, items=12, overlap=2, annotators=[f"r{i}" for i in range(5)], admins=())
    with db.read() as session:
        proj = get_project(session, "demo")
        ids = [a.id for a in session.scalars(select(Annotator).order_by(Annotator.id))]

    def check():
        with db.read() as session:
            for annotator in ids:
                plain = session.scalar(select(func.count()).select_from(queue.ELIGIBLE.subquery()),
                                       queue._queue_params(proj, annotator, queue.LEASE_SECONDS))
                assert queue.available_count(session, proj, annotator) == plain

    check()
    for step in range(30):  # serve, label, skip and let leases lapse, checking after every change
        annotator = ids[step % len(ids)]
        served = queue.next_item(db, proj, annotator)
        if served is None:
            continue
        if step % 5 == 1:
            queue.skip(db, proj, annotator, served.item.id)
        elif step % 5 != 3:  # every fifth served item is left open
            queue.submit(db, proj, annotator, served.item.id, {"choice": "B"}, "", f"s{step}")
        if step % 7 == 6:
            _expire_leases(db)
        check()
    with db.read() as session:
        assert 0 < queue.available_count(session, proj, ids[0]) < 12  # the states above were not trivial
