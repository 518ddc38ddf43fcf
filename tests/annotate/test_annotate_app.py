"""The web app in-process, on SQLite and PostgreSQL: authentication, isolation, CSRF, limits, escaping."""

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from preftune.annotate import admin, api as api_routes, pages
from preftune.annotate.app import ServerSettings, create_app
from preftune.annotate.models import Annotator, Label
from preftune.annotate.tokens import hash_token, revoke

XSS = "<script>window.pwned = 1</script>"


@pytest.fixture()
def site(db, make_project):
    tokens = make_project(db, items=3, overlap=2, prompts=[f"{XSS} prompt {i}" for i in range(3)],
                          guidelines=f"# Rules\n\nBe **kind**. {XSS} [x](javascript:alert(1))")
    app = create_app(db, ServerSettings(max_body=20_000))
    return app, tokens


def api(app, token):
    return TestClient(app, headers={"authorization": f"Bearer {token}"})


def browser_login(app, token) -> TestClient:
    client = TestClient(app)
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    assert client.post("/login", data={"token": token, "csrf_token": csrf}, follow_redirects=False).status_code == 303
    return client


def form_fields(html: str) -> dict:
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html))


def test_no_route_works_without_a_valid_token(site):
    app, tokens = site
    anonymous, wrong = TestClient(app), api(app, "pt_" + "x" * 43)
    checked = 0
    for route in [*pages.router.routes, *api_routes.router.routes, *admin.router.routes]:
        path = route.path
        if path == "/login":
            continue
        url = re.sub(r"\{[^}]+\}", "1", path)
        for method in route.methods - {"HEAD"}:
            for client in (anonymous, wrong):
                response = client.request(method, url, follow_redirects=False)
                if response.status_code == 303:
                    assert response.headers["location"] == "/login"
                else:
                    assert response.status_code in (401, 403), (method, url, response.status_code)
                checked += 1
    assert checked >= 2 * 15
    with app.state.db.write() as session:
        revoke(session, "alice")
    assert api(app, tokens["alice"]).get("/api/projects").status_code == 401


def test_tokens_are_stored_hashed(site):
    app, tokens = site
    with app.state.db.read() as session:
        stored = {a.name: a.token_hash for a in session.scalars(select(Annotator))}
    assert stored["alice"] == hash_token(tokens["alice"]) and tokens["alice"] not in stored.values()


def test_annotators_see_only_their_own_queue_and_labels_and_no_admin_routes(site):
    app, tokens = site
    alice, bob, boss = api(app, tokens["alice"]), api(app, tokens["bob"]), api(app, tokens["boss"])
    item = alice.get("/api/projects/1/next").json()["item"]
    made = alice.post(f"/api/projects/1/items/{item['item_id']}/label", json={"choice": "A", "note": "mine",
                                                                             "request_id": "r1"})
    assert made.status_code == 201
    label_id = made.json()["label_id"]
    assert alice.get(f"/api/labels/{label_id}").json()["note"] == "mine"
    assert bob.get(f"/api/labels/{label_id}").status_code == 404
    assert bob.get("/api/projects/1/labels").json() == []
    # bob cannot label (or overwrite) an item he was not served
    theft = bob.post(f"/api/projects/1/items/{item['item_id'] + 1}/label", json={"choice": "B", "request_id": "x"})
    assert theft.status_code == 404
    bob_item = bob.get("/api/projects/1/next").json()["item"]
    assert bob.post(f"/api/projects/1/items/{bob_item['item_id']}/label",
                    json={"choice": "B", "request_id": "r1"}).status_code == 201
    with app.state.db.read() as session:
        assert session.scalar(select(Label.note).where(Label.id == label_id)) == "mine"
    for url in ("/admin", "/admin/p/1/export.jsonl", "/admin/p/1/labels.jsonl", "/admin/p/1/stats.json"):
        assert alice.get(url).status_code == 403
        assert boss.get(url).status_code == 200
    assert boss.get("/admin/p/1/stats.json").json()["progress"]["labels"] == 2


def test_labelling_through_the_form_with_csrf_protection(site):
    app, tokens = site
    client = browser_login(app, tokens["alice"])
    page = client.get("/p/1")
    assert page.status_code == 200 and 'data-kind="pairwise"' in page.text
    item_id = int(re.search(r'action="/p/1/items/(\d+)"', page.text).group(1))
    fields = form_fields(page.text)
    post = {**fields, "choice": "B", "strength": "3", "note": f"note {XSS}", "action": "submit"}
    no_csrf = {k: v for k, v in post.items() if k != "csrf_token"}
    assert client.post(f"/p/1/items/{item_id}", data=no_csrf, follow_redirects=False).status_code == 403
    forged = client.post(f"/p/1/items/{item_id}", data=post, headers={"origin": "http://evil.example"},
                         follow_redirects=False)
    assert forged.status_code == 403
    bad = client.post(f"/p/1/items/{item_id}", data={**post, "choice": ""}, follow_redirects=False)
    assert bad.status_code == 422 and "choose A, B or tie" in bad.text
    done = client.post(f"/p/1/items/{item_id}", data=post, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/p/1"
    again = client.post(f"/p/1/items/{item_id}", data=post, follow_redirects=False)  # a double submit
    assert again.status_code == 303
    mine = client.get("/p/1/mine")
    assert "B &gt; A (much)" in mine.text and "&lt;script&gt;" in mine.text and XSS not in mine.text
    assert client.post("/api/projects/1/items/1/skip").status_code == 403  # cookie + JSON API needs the header
    with app.state.db.read() as session:
        assert len(session.scalars(select(Label)).all()) == 1
    login_page = TestClient(app).get("/login")
    no_nonce = TestClient(app).post("/login", data={"token": tokens["alice"], "csrf_token": "guess"})
    assert login_page.status_code == 200 and no_nonce.status_code == 403


def test_user_text_is_escaped_everywhere(site):
    app, tokens = site
    client = browser_login(app, tokens["alice"])
    page = client.get("/p/1").text
    assert XSS not in page and "&lt;script&gt;window.pwned = 1&lt;/script&gt; prompt" in page
    assert "<strong>kind</strong>" in page  # guidelines are markdown ...
    assert 'href="javascript:' not in page  # ... without raw HTML or script links
    assert "content-security-policy" in client.get("/p/1").headers
    assert "script-src 'self'" in client.get("/p/1").headers["content-security-policy"]


def test_oversized_requests_are_refused(site):
    app, tokens = site
    alice = api(app, tokens["alice"])
    item = alice.get("/api/projects/1/next").json()["item"]
    url = f"/api/projects/1/items/{item['item_id']}/label"
    huge = '{"choice": "A", "request_id": "r", "note": "' + "x" * 30_000 + '"}'
    assert alice.post(url, content=huge, headers={"content-type": "application/json"}).status_code == 413

    def chunks():  # no content-length: the limit is enforced while reading
        yield huge[:10_000].encode()
        yield huge[10_000:].encode()

    assert alice.post(url, content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    long_note = alice.post(url, json={"choice": "A", "request_id": "r", "note": "y" * 6000})
    assert long_note.status_code == 422 and "at most 5000" in long_note.json()["detail"]
    assert alice.post(url, json={"choice": "A", "request_id": "r"}).status_code == 201


def test_ranking_and_rating_pages_render_their_controls(db, make_project):
    tokens = make_project(db, kind="ranking", items=1, candidates=3, project="rank", annotators=("a",), admins=())
    tokens.update(make_project(db, kind="rating", items=1, candidates=2, project="rate", annotators=("b",), admins=()))
    app = create_app(db)
    ranking = browser_login(app, tokens["a"]).get("/p/1").text
    assert ranking.count('<select name="rank_') == 3
    rating = browser_login(app, tokens["b"]).get("/p/2").text
    assert rating.count('name="score_A"') == 7 and rating.count('name="score_B"') == 7
