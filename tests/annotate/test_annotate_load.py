"""The real server (uvicorn in a subprocess) under load, killed with SIGKILL, and its logs.

Many annotators at once: 50 concurrent clients make at least 5,000 submissions over loopback, some of
them sent twice at the same moment (a client retrying); every acknowledged label must be stored
exactly once. Killed mid-load and restarted, the server must still hold every label it acknowledged.
"""

import asyncio
import random
import time
import uuid
from collections import Counter

import httpx
import pytest
from sqlalchemy import func, select

from preftune.annotate.db import Database
from preftune.annotate.models import Annotator, Label

CLIENTS = 50
SUBMISSIONS = 5000


async def post(client: httpx.AsyncClient, url: str, body: dict, stop: asyncio.Event | None) -> httpx.Response:
    """POST, retrying the very same request after a network error (as a real client would)."""
    for attempt in range(4):
        try:
            return await client.post(url, json=body)
        except httpx.TransportError:
            if attempt == 3 or (stop is not None and stop.is_set()):
                raise
            await asyncio.sleep(0.05)


async def annotate(base_url: str, token: str, quota: int, acked: list, stop: asyncio.Event | None = None,
                   retry_share: float = 0.1, seed: int = 0) -> None:
    """One annotator: fetch the next item, answer it, sometimes send the same answer twice at once."""
    rng = random.Random(seed)
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
        done = 0
        item = (await client.get("/api/projects/1/next")).raise_for_status().json()["item"]
        while item is not None and done < quota and not (stop and stop.is_set()):
            body = {"choice": rng.choice(["A", "B", "B", "tie"]), "request_id": uuid.uuid4().hex,
                    "note": rng.choice(["", "fine", "<b>bold</b> claim"])}
            url = f"/api/projects/1/items/{item['item_id']}/label?next=true"
            copies = 2 if rng.random() < retry_share else 1
            responses = await asyncio.gather(*[post(client, url, body, stop) for _ in range(copies)])
            assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses]
            outcomes = sorted(r.json()["outcome"] for r in responses)
            assert outcomes in (["created"], ["created", "duplicate"]), outcomes
            assert len({r.json()["label_id"] for r in responses}) == 1
            acked.append((token, item["item_id"], body["request_id"], body["note"]))
            done += 1
            item = responses[0].json()["next"]


def stored_labels(db_url: str) -> dict:
    database = Database(db_url)
    with database.read() as session:
        rows = session.execute(select(Label.request_id, Label.item_id, Annotator.name, Label.note)
                               .join(Annotator, Annotator.id == Label.annotator_id)).all()
        count = session.scalar(select(func.count()).select_from(Label))
    database.dispose()
    assert count == len(rows)
    return {request_id: (item_id, name, note) for request_id, item_id, name, note in rows}


@pytest.mark.slow
def test_fifty_clients_five_thousand_submissions_each_label_stored_once(db_url, db, make_project, start_server):
    tokens = make_project(db, items=1800, overlap=3, annotators=[f"rater{i:02d}" for i in range(CLIENTS)], admins=())
    server = start_server(db_url, "--log-level", "warning")
    acked: list = []
    quota = -(-SUBMISSIONS // CLIENTS)

    async def run():
        await asyncio.gather(*[annotate(server.url, token, quota, acked, seed=i)
                               for i, token in enumerate(tokens.values())])

    started = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - started
    print(f"\n{db_url.split(':')[0]}: {len(acked)} labels from {CLIENTS} clients in {seconds:.1f} s "
          f"({len(acked) / seconds:.0f} labels/s; each reply carries the next item; ~10% sent twice at once)")
    assert len(acked) >= SUBMISSIONS
    stored = stored_labels(db_url)
    assert len(stored) == len(acked) == len({request_id for _, _, request_id, _ in acked})
    names = {token: name for name, token in tokens.items()}
    for token, item_id, request_id, note in acked:
        assert stored[request_id] == (item_id, names[token], note)
    per_item = Counter(item_id for item_id, _, _ in stored.values())
    assert max(per_item.values()) <= 3  # never more annotators than the overlap asks for


@pytest.mark.slow
def test_labels_acknowledged_before_sigkill_survive_a_restart(db_url, db, make_project, start_server):
    tokens = make_project(db, items=600, overlap=2, annotators=[f"rater{i:02d}" for i in range(20)], admins=())
    server = start_server(db_url, "--log-level", "warning")
    acked: list = []

    async def run():
        stop = asyncio.Event()

        async def kill_later():
            while len(acked) < 300:
                await asyncio.sleep(0.01)
            server.kill()  # SIGKILL while requests are in flight
            stop.set()

        tasks = [annotate(server.url, token, 10_000, acked, stop, seed=i) for i, token in enumerate(tokens.values())]
        results = await asyncio.gather(kill_later(), *tasks, return_exceptions=True)
        errors = [r for r in results[1:] if isinstance(r, Exception)]
        assert all(isinstance(e, (httpx.TransportError, httpx.HTTPStatusError)) for e in errors), errors[:3]

    asyncio.run(run())
    assert server.process.returncode == -9 and len(acked) >= 300
    restarted = start_server(db_url, "--log-level", "warning")
    stored = stored_labels(db_url)
    missing = [request_id for _, _, request_id, _ in acked if request_id not in stored]
    assert not missing, f"{len(missing)} acknowledged labels lost"
    # and the restarted server carries on where the queue was left
    again: list = []
    asyncio.run(annotate(restarted.url, tokens["rater00"], 5, again))
    assert len(again) == 5 and len(stored_labels(db_url)) == len(stored) + 5


def test_tokens_never_reach_the_server_log(db_url, db, make_project, start_server):
    tokens = make_project(db, items=2)
    server = start_server(db_url, "--log-level", "debug")
    with httpx.Client(base_url=server.url) as client:
        login = client.get("/login")
        csrf = login.text.split('name="csrf_token" value="')[1].split('"')[0]
        client.post("/login", data={"token": tokens["alice"], "csrf_token": csrf})
        client.get("/p/1")
        client.post("/login", data={"token": tokens["bob"] + "x", "csrf_token": "bad"})
    bearer = {"authorization": f"Bearer {tokens['boss']}"}
    httpx.get(server.url + "/admin", headers=bearer)
    httpx.get(server.url + "/admin/p/1/stats.json", headers=bearer)
    httpx.get(server.url + "/api/projects", headers={"authorization": f"Bearer {tokens['bob']}"})
    server.stop()
    log = server.log()
    assert '"GET /admin HTTP/1.1" 200' in log  # the access log is on ...
    for token in tokens.values():  # ... and holds no token, whole or in part
        assert token not in log and token[3:20] not in log
