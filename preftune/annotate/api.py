"""The JSON API for labelling clients (``Authorization: Bearer <token>``), scoped to the caller's own queue.

Candidates are listed in the order this annotator is shown them and answers name them by letter,
exactly as in the web form. ``request_id`` (any string up to 100 characters) makes a retried
submission return the label it stored the first time instead of storing another.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from . import queue
from .answers import LETTERS, AnswerError, summary
from .members import is_member, visible_projects
from .models import Assignment, Label, Project
from .pages import load_project
from .security import RowId, User, check_csrf, current_user

router = APIRouter(prefix="/api")
MAX_NESTING = 10  # an answer needs 2 (an object holding a list)


def item_json(project: Project, served: queue.Served) -> dict:
    order = served.assignment.display_order
    return {"project_id": project.id, "item_id": served.item.id, "kind": project.kind, "prompt": served.item.prompt,
            "candidates": [{"letter": LETTERS[p], "text": served.item.candidates[i]} for p, i in enumerate(order)],
            "allow_notes": project.allow_notes}


def label_json(project: Project, label: Label, assignment: Assignment) -> dict:
    return {"label_id": label.id, "item_id": label.item_id, "project_id": label.project_id,
            "answer": summary(project.kind, label.answer, assignment.display_order), "note": label.note,
            "request_id": label.request_id, "seconds": label.seconds, "created_at": label.created_at,
            "updated_at": label.updated_at}


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:  # not JSON, not UTF-8
        raise AnswerError("the request body must be a JSON object") from None
    except RecursionError:
        raise AnswerError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise AnswerError("the request body must be a JSON object")
    if nesting(body) > MAX_NESTING:
        raise AnswerError(f"the request body is nested too deeply (at most {MAX_NESTING} levels)")
    return body


def nesting(value) -> int:
    """How deeply lists and objects nest in a JSON value (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return deepest


@router.get("/projects")
def projects(request: Request, user: User = Depends(current_user)):
    lease = request.app.state.settings.lease
    with request.app.state.db.read() as session:
        found = sorted(visible_projects(session, user.id, user.is_admin), key=lambda p: p.id)
        return [{"id": p.id, "name": p.name, "kind": p.kind,
                 "progress": queue.annotator_progress(session, p, user.id, lease)} for p in found]


@router.get("/projects/{project_id}/next")
def next_item(request: Request, project_id: RowId, user: User = Depends(current_user)):
    project = load_project(request, project_id, user)
    served = queue.next_item(request.app.state.db, project, user.id, request.app.state.settings.lease)
    return {"item": item_json(project, served) if served else None}


@router.post("/projects/{project_id}/items/{item_id}/label")
async def post_label(request: Request, project_id: RowId, item_id: RowId, next: bool = False,
                     user: User = Depends(current_user)):
    """Store a label: 201 when new, 200 for a retry (``duplicate``) or a change (``updated``).

    With ``?next=true`` the reply also carries the annotator's next item (saves a round trip).
    """
    check_csrf(request, user, request.headers.get("x-csrf-token"))
    body = await _json_body(request)

    def store():
        db = request.app.state.db
        project = load_project(request, project_id, user)
        lease = request.app.state.settings.lease if next else None
        result = queue.submit(db, project, user.id, item_id, body, body.get("note"), body.get("request_id"), lease)
        reply = {"label_id": result.label.id, "item_id": item_id, "outcome": result.outcome}
        if next:
            reply["next"] = item_json(project, result.next) if result.next else None
        return JSONResponse(reply, 201 if result.outcome == "created" else 200)

    return await run_in_threadpool(store)


@router.post("/projects/{project_id}/items/{item_id}/skip")
async def post_skip(request: Request, project_id: RowId, item_id: RowId, user: User = Depends(current_user)):
    check_csrf(request, user, request.headers.get("x-csrf-token"))
    project = await run_in_threadpool(load_project, request, project_id, user)
    await run_in_threadpool(queue.skip, request.app.state.db, project, user.id, item_id)
    return {"item_id": item_id, "outcome": "skipped"}


@router.get("/projects/{project_id}/labels")
def own_labels(request: Request, project_id: RowId, user: User = Depends(current_user)):
    project = load_project(request, project_id, user)
    with request.app.state.db.read() as session:
        rows = queue.own_labels(session, project, user.id, limit=100_000)
        return [label_json(project, label, assignment) for label, _, assignment in rows]


@router.get("/labels/{label_id}")
def own_label(request: Request, label_id: RowId, user: User = Depends(current_user)):
    with request.app.state.db.read() as session:
        label = session.scalar(select(Label).where(Label.id == label_id, Label.annotator_id == user.id))
        if label is not None and not user.is_admin and not is_member(session, label.project_id, user.id):
            label = None  # taken off the project: its labels are out of reach too
        if label is None:  # someone else's label looks exactly like a missing one
            return JSONResponse({"detail": "no such label"}, 404)
        project = session.get(Project, label.project_id)
        assignment = session.get(Assignment, label.assignment_id)
        return label_json(project, label, assignment)
