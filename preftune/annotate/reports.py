"""A project's analysis for the admin pages, computed again only when its labels change.

The competence model (a Dawid-Skene fit over every label) and the dispute scan cost seconds on a project
with tens of thousands of labels, and admins' dashboards poll. :class:`ProjectReports` (one per server,
used on the admin threads) keeps each project's analysis: its labels, the fitted competence model, the
disputed items and the admin report built from them, under the project's *state*: its settings, its
labels' count, largest id and latest edit, its adjudications' count and latest, its skipped assignments
and the newest item (a few indexed aggregate queries). While the state is unchanged, every admin page
reuses the analysis: nothing is read again and nothing refitted. When it changed, only the labels added
or edited since are read, and the model is refitted starting from the previous fit (a few EM iterations
instead of dozens). ``fits`` counts the fits per project (the admin report shows it).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import func, or_, select

from .adjudication import DISPUTE_THRESHOLD, disputed_items
from .aggregate import LabelRecord, project_competence
from .competence import CompetenceModel
from .models import Adjudication, Annotator, Assignment, Item, Label, Project

RECENT_EDITS = 60.0  # labels edited this long before the latest edit seen are read again (a late commit)
REUSE_FACTOR = 4.0  # an analysis is kept at least this many times as long as it took to compute


@dataclass
class Analysis:
    state: tuple
    records: dict[int, tuple[float, LabelRecord]]  # label id -> (updated_at, record)
    labels: list[LabelRecord]  # as :func:`.aggregate.label_records` orders them
    model: CompetenceModel
    votes: dict
    known: dict
    checked_at: float  # time.monotonic() of the last state check
    computed_at: float  # time.monotonic() when it was computed
    cost: float  # seconds its computation (and its report's) took
    disputes: dict[float, list[dict]] = field(default_factory=dict)  # by threshold
    report: dict | None = None


def project_state(session, project: Project) -> tuple:
    """What an analysis depends on; equal states give equal analyses."""
    labels = session.execute(select(func.count(Label.id), func.max(Label.id), func.max(Label.updated_at))
                             .where(Label.project_id == project.id)).one()
    resolved = session.execute(select(func.count(Adjudication.id), func.max(Adjudication.created_at))
                               .where(Adjudication.project_id == project.id)).one()
    skipped = session.scalar(select(func.count()).select_from(Assignment).where(
        Assignment.project_id == project.id, Assignment.status == "skipped"))
    newest_item = session.scalar(select(func.max(Item.id)))
    settings = (project.name, project.kind, project.overlap, project.gold_rate, project.scored_with)
    return (*settings, *labels, *resolved, skipped, newest_item)


def _label_rows(session, project: Project, *where) -> list[tuple[int, float, LabelRecord]]:
    rows = session.execute(
        select(Label.id, Label.updated_at, Label.item_id, Annotator.name, Label.answer, Assignment.display_order,
               Label.seconds, Label.note, Label.created_at)
        .join(Annotator, Annotator.id == Label.annotator_id)
        .join(Assignment, Assignment.id == Label.assignment_id)
        .where(Label.project_id == project.id, *where))
    return [(row[0], row[1], LabelRecord(*row[2:])) for row in rows]


class ProjectReports:
    """Each project's :class:`Analysis`, reused while the project's state is unchanged."""

    def __init__(self):
        self._found: dict[int, Analysis] = {}
        self._lock = threading.RLock()  # one computes, the others wait and reuse its result
        self.fits: Counter = Counter()  # competence fits per project id
        self.label_reads: Counter = Counter()  # label rows read per project id

    def analysis(self, session, project: Project, max_age: float = 0.0) -> Analysis:
        """The project's analysis; one whose state was checked less than ``max_age`` seconds ago is
        returned without checking again, and one computed less than ``max_age`` seconds ago, or less than
        :data:`REUSE_FACTOR` times as long as it took, is kept even when the labels changed (``max_age`` 0:
        always current): while labels keep coming, admin reports take at most a fifth of the server's time
        however many admins poll."""
        with self._lock:
            found = self._found.get(project.id)
            now = time.monotonic()
            if found is not None and now - found.checked_at < max_age:
                return found
            state = project_state(session, project)
            if found is None or (found.state != state and (
                    max_age <= 0 or now - found.computed_at >= max(max_age, REUSE_FACTOR * found.cost))):
                found = self._refresh(session, project, found, state)
                self._found[project.id] = found
            found.checked_at = time.monotonic()
            return found

    def _refresh(self, session, project: Project, previous: Analysis | None, state: tuple) -> Analysis:
        started = time.monotonic()
        count = state[5]  # the state: five settings, then the labels' count, largest id and latest edit, ...
        records = dict(previous.records) if previous is not None else {}
        if previous is not None:
            seen_id, seen_edit = previous.state[6] or 0, previous.state[7] or 0.0
            rows = _label_rows(session, project, or_(Label.id > seen_id, Label.updated_at > seen_edit - RECENT_EDITS))
        else:
            rows = _label_rows(session, project)
        for label_id, updated_at, record in rows:
            records[label_id] = (updated_at, record)
        read = len(rows)
        if len(records) != count:  # a label committed out of id order: read them all
            rows = _label_rows(session, project)
            records, read = {label_id: (updated_at, record) for label_id, updated_at, record in rows}, read + len(rows)
        self.label_reads[project.id] += read
        labels = [records[label_id][1] for label_id in sorted(records, key=lambda i: (records[i][1].item_id, i))]
        start = previous.model if previous is not None else None
        model, votes, known = project_competence(session, project, labels, start=start)
        self.fits[project.id] += 1
        now = time.monotonic()
        return Analysis(state, records, labels, model, votes, known, now, now, now - started)

    def disputes(self, session, project: Project, threshold: float = DISPUTE_THRESHOLD,
                 max_age: float = 0.0) -> list[dict]:
        """:func:`.adjudication.disputed_items` from the analysis (computed once per state and threshold)."""
        found = self.analysis(session, project, max_age)
        with self._lock:
            if threshold not in found.disputes:
                if len(found.disputes) >= 16:  # thresholds asked for since the state changed
                    found.disputes.clear()
                found.disputes[threshold] = disputed_items(session, project, threshold, found.labels, found.votes)
            return found.disputes[threshold]

    def report(self, session, project: Project, build, max_age: float = 0.0) -> dict:
        """``build(analysis)`` once per state of the project."""
        found = self.analysis(session, project, max_age)
        with self._lock:
            if found.report is None:
                started = time.monotonic()
                found.report = build(found)
                found.cost += time.monotonic() - started
            return found.report
