"""A large project served by the real server: admin reports, asked for by eight clients at once
without pause, must not hold up annotators (``/next`` p95 under 200 ms). Reports count in SQL and run
on their own thread.

The issue asks for 400,000 items; on the shared 2-core test machine importing that many takes over a
minute (SQLite ~60 s, PostgreSQL ~110 s), so by default the test imports 200,000 items on SQLite and
100,000 on PostgreSQL. ``PREFTUNE_ANNOTATE_SCALE_ITEMS=400000`` runs the full size on both.
"""

import itertools
import os
import statistics
import threading
import time
import uuid

import httpx
import pytest

ITEMS = {"sqlite": 200_000, "postgresql": 100_000}
ANNOTATORS = 4
ADMIN_CLIENTS = int(os.environ.get("PREFTUNE_ANNOTATE_SCALE_ADMINS", "8"))
SECONDS = 12.0


def import_items(db, count: int) -> dict:
    from preftune.annotate.importer import ItemSpec, add_items, ensure_project
    from preftune.annotate.members import add_member
    from preftune.annotate.tokens import add_annotator

    tokens = {}
    with db.write() as session:
        project, _ = ensure_project(session, "big", "pairwise", "Pick one.", 1)
        specs = [ItemSpec(f"i{i}", f"Prompt {i}", [f"first {i}", f"second {i}"]) for i in range(count)]
        assert add_items(session, project, specs, seed=0) == (count, 0)
        for i in range(ANNOTATORS):
            tokens[f"a{i}"] = add_annotator(session, f"a{i}")[1]
            add_member(session, "big", f"a{i}")
        tokens["boss"] = add_annotator(session, "boss", is_admin=True)[1]
    return tokens


def annotator_loop(url: str, token: str, stop: threading.Event, latencies: list, errors: list) -> None:
    """Ask for the next item and label it, again and again; the first 3 requests (connections being
    opened on both sides) are not timed."""
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=120) as client:
        for number in itertools.count():
            if stop.is_set():
                return
            started = time.perf_counter()
            response = client.get("/api/projects/1/next")
            if number >= 3:
                latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors.append(response.text)
                return
            item = response.json()["item"]
            answer = {"choice": "A", "request_id": uuid.uuid4().hex}
            if client.post(f"/api/projects/1/items/{item['item_id']}/label", json=answer).status_code != 201:
                errors.append("label refused")
                return


def admin_loop(url: str, token: str, stop: threading.Event, done: list, errors: list) -> None:
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=300) as client:
        while not stop.is_set():
            for path in ("/admin", "/admin/p/1/stats.json"):
                started = time.perf_counter()
                response = client.get(path)
                if response.status_code != 200:
                    errors.append(f"{path}: {response.status_code}")
                    return
                done.append((path, time.perf_counter() - started))


@pytest.mark.slow
def test_next_stays_fast_while_admin_reports_run_on_a_large_project(db_url, db, start_server):
    count = int(os.environ.get("PREFTUNE_ANNOTATE_SCALE_ITEMS") or ITEMS["sqlite" if db.is_sqlite else "postgresql"])
    started = time.perf_counter()
    tokens = import_items(db, count)
    imported = time.perf_counter() - started
    server = start_server(db_url, "--log-level", "warning")
    stop, latencies, reports, errors = threading.Event(), [], [], []
    admins = [threading.Thread(target=admin_loop, args=(server.url, tokens["boss"], stop, reports, errors))
              for _ in range(ADMIN_CLIENTS)]
    annotators = [threading.Thread(target=annotator_loop, args=(server.url, tokens[f"a{i}"], stop, latencies, errors))
                  for i in range(ANNOTATORS)]
    for thread in admins:
        thread.start()
    time.sleep(1.0)  # the admin threads are busy before the annotators start
    for thread in annotators:
        thread.start()
    time.sleep(SECONDS)
    stop.set()
    for thread in annotators + admins:
        thread.join()
    assert not errors, errors[:3]
    p95 = statistics.quantiles(latencies, n=20)[-1]
    report_seconds = [seconds for _, seconds in reports]
    print(f"\n{db_url.split(':')[0]}: {count} items imported in {imported:.1f} s; /next p50 "
          f"{statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms over {len(latencies)} requests; "
          f"{len(reports)} admin reports alongside (median {statistics.median(report_seconds or [0]):.2f} s)")
    assert len(latencies) >= 50 and len(reports) >= min(ADMIN_CLIENTS, 1)  # both kinds of work really ran together
    assert p95 < 0.2
