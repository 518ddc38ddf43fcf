"""A large project served by the real server: admin reports, asked for by eight clients at once
without pause, must not hold up annotators (``/next`` p95 under 200 ms on an idle machine). Reports
count in SQL and run on their own thread; the project starts with a labelling history (30,000 labels
by earlier annotators at overlap 3) so that each report's competence model and dispute scan have real
work, and they are recomputed only when the project's labels changed (the test asserts the number of
competence fits, and prints the p95 with the machine's load).

The issue asks for 400,000 items; on the shared 2-core test machine importing that many takes over a
minute (SQLite ~60 s, PostgreSQL ~110 s), so by default the test imports 200,000 items on SQLite and
100,000 on PostgreSQL. ``PREFTUNE_ANNOTATE_SCALE_ITEMS=400000`` runs the full size on both.
"""

import itertools
import os
import random
import statistics
import threading
import time
import uuid

import httpx
import pytest

ITEMS = {"sqlite": 200_000, "postgresql": 100_000}
ANNOTATORS = 4
OVERLAP = 3
HISTORY_ITEMS = 10_000  # labelled OVERLAP times each by earlier annotators before the server starts
ADMIN_CLIENTS = int(os.environ.get("PREFTUNE_ANNOTATE_SCALE_ADMINS", "8"))
SECONDS = 20.0


def import_items(db, count: int) -> dict:
    from preftune.annotate.importer import ItemSpec, add_items, ensure_project
    from preftune.annotate.members import add_member
    from preftune.annotate.tokens import add_annotator

    tokens = {}
    with db.write() as session:
        project, _ = ensure_project(session, "big", "pairwise", "Pick one.", OVERLAP)
        specs = [ItemSpec(f"i{i}", f"Prompt {i}", [f"first {i}", f"second {i}"]) for i in range(count)]
        assert add_items(session, project, specs, seed=0) == (count, 0)
        for i in range(ANNOTATORS):
            tokens[f"a{i}"] = add_annotator(session, f"a{i}")[1]
            add_member(session, "big", f"a{i}")
        tokens["boss"] = add_annotator(session, "boss", is_admin=True)[1]
        earlier = [add_annotator(session, f"earlier{i}")[0].id for i in range(ANNOTATORS)]
        add_history(session, project, earlier, [0.9, 0.85, 0.8, 0.55])
    return tokens


def add_history(session, project, annotators: list[int], accuracy: list[float]) -> None:
    """Labels by earlier annotators (each right with their accuracy) on HISTORY_ITEMS items, OVERLAP each."""
    from sqlalchemy import insert, select, text, update

    from preftune.annotate.models import Assignment, Item, Label

    rng, now = random.Random(0), time.time() - 86_400  # labelled yesterday, one label a second
    items = session.scalars(select(Item.id).where(Item.project_id == project.id).order_by(Item.id.desc())
                            .limit(HISTORY_ITEMS)).all()
    assignments, labels = [], []
    for item_id in items:
        truth = rng.randrange(2)
        for k in rng.sample(range(len(annotators)), OVERLAP):
            number = len(assignments) + 1
            winner = truth if rng.random() < accuracy[k] else 1 - truth
            assignments.append({"id": number, "item_id": item_id, "annotator_id": annotators[k],
                                "project_id": project.id, "display_order": rng.sample([0, 1], 2), "status": "done",
                                "served_at": 0.0})
            labels.append({"assignment_id": number, "item_id": item_id, "annotator_id": annotators[k],
                           "project_id": project.id, "answer": {"winner": winner, "strength": None}, "note": "",
                           "request_id": f"h{number}", "seconds": 3.0, "created_at": now + number,
                           "updated_at": now + number})
    session.execute(insert(Assignment), assignments)
    if session.get_bind().dialect.name == "postgresql":  # the ids were given: move the sequence past them
        session.execute(text("SELECT setval('assignments_id_seq', (SELECT max(id) FROM assignments))"))
    session.execute(insert(Label), labels)
    session.execute(update(Item).where(Item.id.in_(items)).values(complete=True))


def annotator_loop(url: str, token: str, stop: threading.Event, latencies: list, errors: list) -> None:
    """Ask for the next item and label it, again and again, timing both requests; the first 3 rounds
    (connections being opened on both sides) are not timed."""
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
            started = time.perf_counter()
            labelled = client.post(f"/api/projects/1/items/{item['item_id']}/label", json=answer)
            if number >= 3:
                latencies.append(time.perf_counter() - started)
            if labelled.status_code != 201:
                errors.append("label refused")
                return


def admin_loop(url: str, token: str, stop: threading.Event, done: list, errors: list) -> None:
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=600) as client:
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
    while not reports and not errors:  # the first report (a full fit over the history) is in: polls are steady
        time.sleep(0.2)
    first_report = time.perf_counter()
    for thread in annotators:
        thread.start()
    time.sleep(SECONDS)
    stop.set()
    for thread in annotators + admins:
        thread.join()
    polled = time.perf_counter() - first_report
    assert not errors, errors[:3]
    boss = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {tokens['boss']}"}, timeout=600)
    fits = boss.get("/admin/p/1/stats.json").json()["competence"]["fits"]
    p95 = statistics.quantiles(latencies, n=20)[-1]
    report_seconds = [seconds for _, seconds in reports]
    print(f"\n{db_url.split(':')[0]}: {count} items imported in {imported:.1f} s; /next and label p50 "
          f"{statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms over {len(latencies)} requests; "
          f"{len(reports)} admin reports alongside (median {statistics.median(report_seconds or [0]):.2f} s) from "
          f"{fits} competence fits; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    assert len(latencies) >= 50 and len(reports) >= min(ADMIN_CLIENTS, 1)  # both kinds of work really ran together
    # the work an admin poll costs: a fit only when labels changed, at most one per report period (2 s)
    assert fits <= 2 + polled / 2.0 and fits * 4 <= len(reports)
    settled = []
    for _ in range(4):  # labelling stopped: of these polls, 2 s apart, at most one fits the last labels
        time.sleep(2.1)
        settled.append(boss.get("/admin/p/1/stats.json").json()["competence"]["fits"])
    assert settled[-1] - fits <= 1, (fits, settled)
