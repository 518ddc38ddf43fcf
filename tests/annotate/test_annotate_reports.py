"""Admin analyses kept per project: an admin poll refits the competence model and reads labels only when the
project's labels (or adjudications, skips, settings) changed; what it then reads is the change, and the
fit started from the previous one agrees with a fit from scratch."""

import random

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from preftune.annotate import queue
from preftune.annotate.aggregate import label_records, project_competence
from preftune.annotate.app import ServerSettings, create_app
from preftune.annotate.importer import get_project
from preftune.annotate.models import Annotator, Label
from preftune.annotate.reports import ProjectReports

ACCURACY = {"ann": 0.95, "bea": 0.85, "cid": 0.75}  # how often each says the first candidate is better (it is)


def label_some(db, project, names, count, rng):
    with db.read() as session:
        people = dict(session.execute(select(Annotator.name, Annotator.id).where(Annotator.name.in_(names))).all())
    done = 0
    for name in names:
        while done < count and (served := queue.next_item(db, project, people[name])) is not None:
            first = "AB"[served.assignment.display_order.index(0)]
            choice = first if rng.random() < ACCURACY[name] else "AB"[first == "A"]
            queue.submit(db, project, people[name], served.item.id, {"choice": choice}, "",
                         f"{name}-{served.item.id}-{choice}")
            done += 1
    return people


def test_an_analysis_is_reused_until_the_labels_change_and_then_reads_only_the_change(db, make_project):
    names = ("ann", "bea", "cid")
    make_project(db, items=40, overlap=3, annotators=names)
    rng = random.Random(0)
    with db.read() as session:
        project = get_project(session, "demo")
    label_some(db, project, names, 90, rng)
    with db.write() as session:  # labelled long ago, 100 s apart
        session.execute(update(Label).values(created_at=1e9 + 100 * Label.id, updated_at=1e9 + 100 * Label.id))
    reports = ProjectReports()
    with db.read() as session:
        first = reports.analysis(session, project)
        for _ in range(5):  # unchanged labels: nothing read, nothing refitted
            assert reports.analysis(session, project) is first
            reports.disputes(session, project)
    assert (reports.fits[project.id], reports.label_reads[project.id]) == (1, 90)

    people = label_some(db, project, names, 6, rng)
    with db.read() as session:
        second = reports.analysis(session, project)
        fresh = label_records(session, project)
        cold = project_competence(session, project, fresh)[0]
    assert reports.fits[project.id] == 2 and len(second.labels) == 96 and second.labels == fresh
    # the new labels and those of the minute before the last edit seen (one), not all again
    assert reports.label_reads[project.id] == 90 + 6 + 1
    for name, found in cold.annotators.items():
        assert abs(second.model.annotators[name].accuracy - found.accuracy) < 1e-5

    # an edited label changes the state too, and the analysis has the new answer
    label = next(r for r in fresh if r.annotator == "ann")
    item_id = label.item_id
    flipped = "B" if label.answer["winner"] == label.display_order[0] else "A"
    queue.submit(db, project, people["ann"], item_id, {"choice": flipped}, "", "edit-1")
    with db.read() as session:
        third = reports.analysis(session, project)
        assert third.labels == label_records(session, project) and third.labels != fresh
    assert reports.fits[project.id] == 3


def test_admin_polls_fit_once_per_change_and_a_busy_project_is_refitted_at_most_once_a_period(db, make_project):
    names = ("ann", "bea")
    tokens = make_project(db, items=30, overlap=2, annotators=names)
    with db.read() as session:
        project = get_project(session, "demo")
    rng = random.Random(1)
    label_some(db, project, names, 20, rng)
    app = create_app(db, ServerSettings(report_seconds=0.0))
    boss = TestClient(app, headers={"authorization": f"Bearer {tokens['boss']}"})
    fits = [boss.get(path).status_code == 200 and app.state.reports.fits[project.id]
            for path in ("/admin/p/1/stats.json", "/admin", "/admin/p/1/disputes.json", "/admin/p/1/stats.json")]
    assert fits == [1, 1, 1, 1]  # four admin pages, one fit
    label_some(db, project, names, 2, rng)
    stats = boss.get("/admin/p/1/stats.json").json()
    assert stats["competence"]["fits"] == 2 and stats["competence"]["labels"] == 22

    # report_seconds: while labels keep coming, a report is reused for that long (here: the whole loop)
    app = create_app(db, ServerSettings(report_seconds=3600.0))
    boss = TestClient(app, headers={"authorization": f"Bearer {tokens['boss']}"})
    for _ in range(5):
        label_some(db, project, names, 1, rng)
        boss.get("/admin/p/1/stats.json")
    assert app.state.reports.fits[project.id] == 1
    # the disputes pages are always current (admins act on them): a fit for the new labels
    boss.get("/admin/p/1/disputes.json")
    assert app.state.reports.fits[project.id] == 2
