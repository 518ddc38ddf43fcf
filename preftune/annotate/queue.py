"""Who labels what: serving items to annotators, storing their labels exactly once, skipping.

An item goes to ``project.overlap`` annotators. Serving an item creates an assignment that records the
randomised order the annotator sees the candidates in; an open assignment holds its place for
``lease`` seconds. Items are served by ``(priority, random_key)``: random unless a reward model has
set priorities (see ``ordering``). A label is unique per (item, annotator) and per (annotator,
request id): a retried request returns the stored label instead of adding another. An item never
gets more than ``overlap`` labels, whatever the order of skips, leases and retries: a late label is
taken only while a place is free, and when an item is complete the others' open assignments of it
expire (they are not served again).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from .answers import AnswerError, parse_answer
from .models import Assignment, Item, Label, Project

LEASE_SECONDS = 30 * 60
MAX_NOTE = 5000
MAX_REQUEST_ID = 100
_system_random = random.SystemRandom()
_shuffle, _chance = _system_random.shuffle, _system_random.random
_A, _I, _L = Assignment.__table__, Item.__table__, Label.__table__
ASSIGNMENT_COLUMNS = (_A.c.id, _A.c.item_id, _A.c.display_order, _A.c.status, _A.c.served_at)
Row = SimpleNamespace


class NotAssigned(LookupError):
    """The item is not in this annotator's queue (or does not exist)."""


class RequestConflict(Exception):
    """The request id was already used for a different item, or the item was labelled already."""


@dataclass
class Served:
    assignment: Any  # id, item_id, display_order, status, served_at
    item: Any  # id, external_id, prompt, candidates
    label: Label | None = None


@dataclass
class Submitted:
    label: Any  # id
    outcome: str  # created, updated, duplicate
    next: Served | None = None


# Built once with bind parameters (project_id, annotator_id, overlap, cutoff = now - lease): the queue
# query runs for every label served, and reusing the statement spares SQLAlchemy rebuilding it.
_HOLDS_PLACE = or_(_A.c.status == "done", and_(_A.c.status == "open", _A.c.served_at > bindparam("cutoff")))
_TAKEN = select(func.count()).select_from(_A).where(_A.c.item_id == _I.c.id, _HOLDS_PLACE).scalar_subquery()
ELIGIBLE = select(_I.c.id).where(
    _I.c.project_id == bindparam("project_id"), _I.c.complete.is_(False),
    ~exists().where(_A.c.item_id == _I.c.id, _A.c.annotator_id == bindparam("annotator_id")),
    _TAKEN < bindparam("overlap"))
FIRST_ELIGIBLE = ELIGIBLE.order_by(_I.c.priority, _I.c.random_key).limit(1)
CLAIM_UNLOCKED = FIRST_ELIGIBLE.with_for_update(of=_I, key_share=True, skip_locked=True)
CLAIM_WAITING = FIRST_ELIGIBLE.with_for_update(of=_I, key_share=True)
PLACES_TAKEN = select(func.count()).select_from(_A).where(_A.c.item_id == bindparam("item_id"), _HOLDS_PLACE)
# gold items: served to every annotator once (never counted against the overlap), in random_key order
NEXT_GOLD = select(_I.c.id).where(
    _I.c.project_id == bindparam("project_id"), _I.c.is_gold.is_(True),
    ~exists().where(_A.c.item_id == _I.c.id, _A.c.annotator_id == bindparam("annotator_id"))
).order_by(_I.c.random_key).limit(1)


def _queue_params(project: Project, annotator_id: int, lease: float) -> dict:
    return {"project_id": project.id, "annotator_id": annotator_id, "overlap": project.overlap,
            "cutoff": time.time() - lease}


def _lock_item(session, item_id: int) -> None:
    """PostgreSQL row lock (FOR NO KEY UPDATE: it does not block inserts that reference the item)."""
    session.execute(select(Item.id).where(Item.id == item_id).with_for_update(key_share=True))


def next_item(db, project: Project, annotator_id: int, lease: float = LEASE_SECONDS) -> Served | None:
    """The annotator's open item, else a new one (first by priority); None when their queue is empty."""
    for _ in range(5):
        try:
            with db.write(durable=False) as session:  # an assignment is cheap to lose; a label is not
                return serve(session, project, annotator_id, lease, locking=not db.is_sqlite)
        except IntegrityError:  # the same annotator asked twice at once (PostgreSQL); the retry sees it
            continue
    raise RuntimeError("could not serve an item after 5 attempts")


def serve(session, project: Project, annotator_id: int, lease: float, locking: bool) -> Served | None:
    """``next_item`` inside a transaction; ``locking``: claim items with row locks (PostgreSQL).

    The hot paths use plain table rows rather than ORM objects: they run once per label.
    """
    now = time.time()
    current = session.execute(select(*ASSIGNMENT_COLUMNS).join(_I, _I.c.id == _A.c.item_id).where(
        _A.c.annotator_id == annotator_id, _A.c.project_id == project.id, _A.c.status == "open",
        or_(_I.c.complete.is_(False), _I.c.is_gold.is_(True))).order_by(_A.c.served_at, _A.c.id).limit(1)).first()
    if current is not None:
        return Served(current, _item_row(session, current.item_id))
    params = _queue_params(project, annotator_id, lease)
    item_id = _claim(session, params) if locking else session.scalar(FIRST_ELIGIBLE, params)
    if item_id is None:
        return None  # nothing left to label: gold items are mixed into work, never served on their own
    gold_rate = getattr(project, "gold_rate", 0.0) or 0.0
    if gold_rate > 0 and _chance() < gold_rate:
        item_id = session.scalar(NEXT_GOLD, params) or item_id
    item = _item_row(session, item_id)
    order = list(range(len(item.candidates)))
    _shuffle(order)
    values = {"item_id": item_id, "annotator_id": annotator_id, "project_id": project.id, "display_order": order,
              "status": "open", "served_at": now}
    new_id = session.execute(insert(_A).values(**values).returning(_A.c.id)).scalar_one()
    return Served(Row(id=new_id, **values), item)


def _item_row(session, item_id: int):
    return session.execute(select(_I.c.id, _I.c.external_id, _I.c.prompt, _I.c.candidates)
                           .where(_I.c.id == item_id)).one()


def _claim(session, params: dict, attempts: int = 50) -> int | None:
    """PostgreSQL: lock the first eligible item nobody else is claiming (SKIP LOCKED), waiting for the
    others only when every eligible item is being claimed; recount its places under the lock."""
    for _ in range(attempts):
        item_id = session.scalar(CLAIM_UNLOCKED, params)
        if item_id is None:
            item_id = session.scalar(CLAIM_WAITING, params)
            if item_id is None:
                return None
        if session.scalar(PLACES_TAKEN, {**params, "item_id": item_id}) < params["overlap"]:
            return item_id
    return None


def own_item(session, project: Project, annotator_id: int, item_id: int) -> Served:
    """An item this annotator was served, with their label if any; anything else is NotAssigned."""
    assignment = session.scalar(select(Assignment).where(
        Assignment.item_id == item_id, Assignment.annotator_id == annotator_id, Assignment.project_id == project.id))
    if assignment is None:
        raise NotAssigned(item_id)
    label = session.scalar(select(Label).where(Label.assignment_id == assignment.id))
    return Served(assignment, session.get(Item, item_id), label)


def storable(value: str, what: str) -> str:
    """Text both databases can store: no NUL characters (PostgreSQL refuses them), no lone surrogates."""
    if "\x00" in value:
        raise AnswerError(f"{what}: NUL characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AnswerError(f"{what}: not valid Unicode text (a lone surrogate)") from None
    return value


def clean_note(project: Project, note) -> str:
    note = (note or "").strip() if isinstance(note, (str, type(None))) else None
    if note is None:
        raise AnswerError("note: expected text")
    storable(note, "note")
    if note and not project.allow_notes:
        raise AnswerError("this project does not take notes")
    if len(note) > MAX_NOTE:
        raise AnswerError(f"note: at most {MAX_NOTE} characters, got {len(note)}")
    return note


def submit(db, project: Project, annotator_id: int, item_id: int, fields, note, request_id: str,
           then_serve: float | None = None) -> Submitted:
    """Store (or edit) the annotator's label for an item they were served. Retries are harmless.

    ``then_serve=lease`` also serves the annotator's next item in the same transaction (``.next``).
    """
    if not request_id or not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID:
        raise AnswerError(f"request_id: expected a string of 1 to {MAX_REQUEST_ID} characters")
    storable(request_id, "request_id")
    note = clean_note(project, note)
    for attempt in range(3):
        try:
            with db.write() as session:
                result = store(session, project, annotator_id, item_id, fields, note, request_id,
                               locking=not db.is_sqlite, check_request_id=attempt > 0)
                if then_serve is not None:
                    result.next = serve(session, project, annotator_id, then_serve, locking=not db.is_sqlite)
                return result
        except IntegrityError:  # request id taken, or a concurrent copy of this request won: look again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_OWN = (select(_A.c.id, _A.c.display_order, _A.c.served_at, _A.c.status, _L.c.id.label("label_id"), _L.c.request_id,
               _I.c.is_gold)
        .select_from(_A.join(_I, _I.c.id == _A.c.item_id).outerjoin(_L, _L.c.assignment_id == _A.c.id))
        .where(_A.c.item_id == bindparam("item_id"), _A.c.annotator_id == bindparam("annotator_id"),
               _A.c.project_id == bindparam("project_id")))
_REQUEST_USED = select(_L.c.id).where(_L.c.annotator_id == bindparam("annotator_id"),
                                      _L.c.request_id == bindparam("request_id"))
_ADD_LABEL = insert(_L).returning(_L.c.id)
_LABELS_OF_ITEM = select(func.count()).select_from(_L).where(_L.c.item_id == bindparam("item_id"))


def store(session, project: Project, annotator_id: int, item_id: int, fields, note: str, request_id: str,
          locking: bool, check_request_id: bool = False) -> Submitted:
    """``submit`` inside a transaction (``note`` already cleaned)."""
    now = time.time()
    if locking:  # one submission per item at a time, so the last label cannot miss "complete"
        _lock_item(session, item_id)
    keys = {"item_id": item_id, "annotator_id": annotator_id, "project_id": project.id}
    found = session.execute(_OWN, keys).first()
    if found is None:
        raise NotAssigned(item_id)
    answer = parse_answer(project.kind, fields, found.display_order)
    if found.label_id is not None:
        if found.request_id == request_id:
            return Submitted(Row(id=found.label_id), "duplicate")
        session.execute(update(_L).where(_L.c.id == found.label_id).values(answer=answer, note=note, updated_at=now))
        return Submitted(Row(id=found.label_id), "updated")
    if check_request_id and session.scalar(_REQUEST_USED, {**keys, "request_id": request_id}) is not None:
        raise RequestConflict(f"request id {request_id!r} was already used for another item")
    if found.status == "skipped":
        raise RequestConflict("you skipped this item, so it went to someone else; it cannot be labelled now")
    if found.is_gold:  # every annotator may label a gold item; it never completes nor expires anyone
        label_id = session.execute(_ADD_LABEL, {
            **keys, "assignment_id": found.id, "answer": answer, "note": note, "request_id": request_id,
            "seconds": max(0.0, now - found.served_at), "created_at": now, "updated_at": now}).scalar_one()
        session.execute(update(_A).where(_A.c.id == found.id).values(status="done"))
        return Submitted(Row(id=label_id), "created")
    labels = session.scalar(_LABELS_OF_ITEM, keys)
    if labels >= project.overlap:
        raise RequestConflict("this item already has all the labels it needs (your time on it ran out and "
                              "others labelled it); your answer was not stored")
    label_id = session.execute(_ADD_LABEL, {
        **keys, "assignment_id": found.id, "answer": answer, "note": note, "request_id": request_id,
        "seconds": max(0.0, now - found.served_at), "created_at": now, "updated_at": now}).scalar_one()
    session.execute(update(_A).where(_A.c.id == found.id).values(status="done"))
    if labels + 1 >= project.overlap:
        session.execute(update(_I).where(_I.c.id == item_id).values(complete=True))
        session.execute(update(_A).where(_A.c.item_id == item_id, _A.c.status == "open").values(status="expired"))
    return Submitted(Row(id=label_id), "created")


def skip(db, project: Project, annotator_id: int, item_id: int) -> None:
    """Pass on an item: it goes to someone else and is not served to this annotator again."""
    with db.write() as session:
        served = own_item(session, project, annotator_id, item_id)
        if served.label is not None:
            raise RequestConflict("this item is already labelled; edit the label instead")
        served.assignment.status = "skipped"


# How many items the queue query could still serve, without visiting every item: the project's
# incomplete items, less those the annotator was served, less those whose places are all held. An
# incomplete item has fewer done assignments than places, so a full one has a live open assignment.
_MINE = exists().where(_A.c.item_id == _I.c.id, _A.c.annotator_id == bindparam("annotator_id"))
_INCOMPLETE = select(func.count()).select_from(_I).where(_I.c.project_id == bindparam("project_id"),
                                                         _I.c.complete.is_(False))
_MINE_INCOMPLETE = select(func.count()).select_from(_A.join(_I, _I.c.id == _A.c.item_id)).where(
    _A.c.annotator_id == bindparam("annotator_id"), _A.c.project_id == bindparam("project_id"),
    _I.c.complete.is_(False))
_LIVE_OPEN = select(_A.c.item_id).where(_A.c.project_id == bindparam("project_id"), _A.c.status == "open",
                                        _A.c.served_at > bindparam("cutoff"))
_FULL_NOT_MINE = select(func.count()).select_from(_I).where(
    _I.c.id.in_(_LIVE_OPEN), _I.c.complete.is_(False), ~_MINE, _TAKEN >= bindparam("overlap"))


def available_count(session, project: Project, annotator_id: int, lease: float = LEASE_SECONDS) -> int:
    """``count(ELIGIBLE)`` from three small counts (the same number; a test checks)."""
    params = _queue_params(project, annotator_id, lease)
    return (session.scalar(_INCOMPLETE, params) - session.scalar(_MINE_INCOMPLETE, params)
            - session.scalar(_FULL_NOT_MINE, params))


def annotator_progress(session, project: Project, annotator_id: int, lease: float = LEASE_SECONDS) -> dict:
    """Labelled, skipped and still-to-do counts for one annotator (what their progress bar shows)."""
    query = select(Assignment.status, func.count()).where(
        Assignment.annotator_id == annotator_id, Assignment.project_id == project.id).group_by(Assignment.status)
    counts = dict(session.execute(query).all())
    available = available_count(session, project, annotator_id, lease)
    done, skipped, open_ = counts.get("done", 0), counts.get("skipped", 0), counts.get("open", 0)
    return {"done": done, "skipped": skipped, "remaining": available + open_, "total": done + available + open_}


def project_progress(session, project: Project) -> dict:
    """Items, labels stored, labels wanted (items x overlap) and items with all their labels (gold items and
    their labels left out; ``gold_items`` and ``gold_labels`` count them)."""
    gold = dict(session.execute(select(Item.is_gold, func.count()).where(Item.project_id == project.id)
                                .group_by(Item.is_gold)).all())
    items = gold.get(False, 0)
    gold_labels = session.scalar(select(func.count()).select_from(Label).join(Item, Item.id == Label.item_id)
                                 .where(Label.project_id == project.id, Item.is_gold.is_(True)))
    per_item = (select(Label.item_id, func.count().label("n")).join(Item, Item.id == Label.item_id)
                .where(Label.project_id == project.id, Item.is_gold.is_(False)).group_by(Label.item_id).subquery())
    labels = int(session.scalar(select(func.coalesce(func.sum(per_item.c.n), 0))))  # PostgreSQL sums are Decimal
    complete = session.scalar(select(func.count()).select_from(per_item).where(per_item.c.n >= project.overlap))
    wanted = items * project.overlap
    return {"items": items, "labels": labels, "wanted": wanted, "complete_items": complete,
            "fraction": min(1.0, labels / wanted) if wanted else 0.0, "gold_items": gold.get(True, 0),
            "gold_labels": gold_labels}


def own_labels(session, project: Project, annotator_id: int, limit: int = 500) -> list[tuple[Label, Item, Assignment]]:
    rows = session.execute(
        select(Label, Item, Assignment).join(Item, Item.id == Label.item_id)
        .join(Assignment, Assignment.id == Label.assignment_id)
        .where(Label.annotator_id == annotator_id, Label.project_id == project.id)
        .order_by(Label.created_at.desc()).limit(limit)).all()
    return [tuple(row) for row in rows]
