"""The HTML pages: log in, the projects, the labelling form, one's own labels."""

from __future__ import annotations

import secrets
import uuid

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from . import queue, sessions
from .answers import LETTERS, STRENGTHS, AnswerError, form_values, summary
from .images import image_count, stored_image
from .members import is_member, visible_projects
from .models import Item, Project
from .security import RowId, User, check_csrf, client_address, current_user, login_cookie, same_origin, session_cookie
from .tokens import find_annotator

router = APIRouter()
_markdown = MarkdownIt("commonmark", {"html": False})  # raw HTML in guidelines is shown as text
KIND_TEXT = {"pairwise": "pick the better of two", "ranking": "rank the responses", "rating": "score each response 1-7",
             "binary": "thumbs up or down"}
KEYS_HELP = {
    "pairwise": "Keys: a / ← A is better · b / → B is better · t tie · 1 2 3 how much · n note · Enter submit · s skip",
    "ranking": "Keys: press the letters best first (a, b, ...) · Backspace clears · n note · Enter submit · s skip",
    "rating": "Keys: 1-7 scores the outlined response and moves on · ← → move · n note · Enter submit · s skip",
    "binary": "Keys: u / + thumbs up · d / - thumbs down · n note · Enter submit · s skip",
}


def render(request: Request, name: str, context: dict, status: int = 200):
    return request.app.state.templates.TemplateResponse(request, name, context, status_code=status)


def guidelines_html(text: str):
    return Markup(_markdown.render(text)) if text.strip() else None


def load_project(request: Request, project_id: int, user: User | None = None) -> Project:
    """The project, or 404; with ``user`` (not an admin) also 404 unless they are a member."""
    with request.app.state.db.read() as session:
        project = session.get(Project, project_id)
        if project is not None and user is not None and not user.is_admin and not is_member(session, project_id,
                                                                                               user.id):
            project = None  # looks exactly like a missing project
    if project is None:
        raise HTTPException(404, "no such project")
    return project


def _set_cookie(request: Request, response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=request.app.state.settings.secure_cookies)


def _login_page(request: Request, error: str | None = None, status: int = 200):
    nonce = secrets.token_urlsafe(24)
    response = render(request, "login.html", {"title": "Log in", "user": None, "csrf": nonce, "error": error}, status)
    _set_cookie(request, response, login_cookie(request), nonce, 3600)
    return response


@router.get("/login")
def login_form(request: Request):
    return _login_page(request)


@router.post("/login")
async def login(request: Request):
    limiter, address = request.app.state.login_limiter, client_address(request)
    form = await request.form()
    nonce = request.cookies.get(login_cookie(request)) or ""
    if not nonce or not sessions.secrets_match(nonce, form.get("csrf_token")) or not same_origin(request):
        return _login_page(request, "The login form expired; please try again.", 403)
    token = form.get("token")
    token = token.strip() if isinstance(token, str) else ""
    old_session = request.cookies.get(session_cookie(request))

    def log_in():
        with request.app.state.db.write() as session:
            annotator = find_annotator(session, token)
            if annotator is None:  # the limit refuses failures only: a valid token is never locked out
                limiter.check(address)
                return None, None
            sessions.end(session, old_session)  # a fresh id at every login (no session fixation)
            return annotator, sessions.start(session, annotator.id)

    annotator, session_id = await run_in_threadpool(log_in)
    if annotator is None:
        limiter.failed(address)
        return _login_page(request, "That token is not valid (or has been revoked).", 401)
    response = RedirectResponse("/admin" if annotator.is_admin else "/", status_code=303)
    _set_cookie(request, response, session_cookie(request), session_id, sessions.SESSION_SECONDS)
    _set_cookie(request, response, login_cookie(request), "", 0)  # delete it
    return response


@router.post("/logout")
async def logout(request: Request, user: User = Depends(current_user)):
    form = await request.form()
    check_csrf(request, user, form.get("csrf_token"))
    if user.by_cookie:

        def log_out():
            with request.app.state.db.write() as session:
                sessions.end(session, user.secret)

        await run_in_threadpool(log_out)
    response = RedirectResponse("/login", status_code=303)
    _set_cookie(request, response, session_cookie(request), "", 0)  # delete it
    return response


@router.get("/")
def home(request: Request, user: User = Depends(current_user)):
    db, lease = request.app.state.db, request.app.state.settings.lease
    with db.read() as session:
        projects = visible_projects(session, user.id, user.is_admin)
        rows = [{"id": p.id, "name": p.name, "kind_text": KIND_TEXT[p.kind],
                 "progress": queue.annotator_progress(session, p, user.id, lease)} for p in projects]
    return render(request, "home.html", {"title": "Projects", "user": user, "projects": rows})


def _label_page(request: Request, user: User, project: Project, served: queue.Served, *, values=None, note=None,
                error=None, return_to="next", status=200):
    with request.app.state.db.read() as session:
        progress = queue.annotator_progress(session, project, user.id, request.app.state.settings.lease)
        images = image_count(session.get(Item, served.item.id).meta)
    label = served.label
    if values is None:
        values = form_values(project.kind, label.answer, served.assignment.display_order) if label else {}
    order = served.assignment.display_order
    context = {
        "title": project.name, "user": user, "project": project, "item": served.item, "progress": progress,
        "shown": [(LETTERS[p], served.item.candidates[index]) for p, index in enumerate(order)],
        "values": values, "note": note if note is not None else (label.note if label else ""),
        "editing": label is not None, "error": error, "request_id": uuid.uuid4().hex, "return_to": return_to,
        "guidelines_html": guidelines_html(project.guidelines), "strengths": list(STRENGTHS.items()),
        "keys_help": KEYS_HELP[project.kind], "images": range(1, images + 1),
    }
    return render(request, "label.html", context, status)


@router.get("/p/{project_id}")
def next_page(request: Request, project_id: RowId, user: User = Depends(current_user)):
    project = load_project(request, project_id, user)
    served = queue.next_item(request.app.state.db, project, user.id, request.app.state.settings.lease)
    if served is None:
        with request.app.state.db.read() as session:
            progress = queue.annotator_progress(session, project, user.id, request.app.state.settings.lease)
        return render(request, "done.html",
                      {"title": "All done", "user": user, "project": project, "progress": progress})
    return _label_page(request, user, project, served)


@router.get("/p/{project_id}/items/{item_id}")
def item_page(request: Request, project_id: RowId, item_id: RowId, user: User = Depends(current_user)):
    project = load_project(request, project_id, user)
    with request.app.state.db.read() as session:
        served = queue.own_item(session, project, user.id, item_id)
    return _label_page(request, user, project, served, return_to="mine" if served.label else "next")


@router.post("/p/{project_id}/items/{item_id}")
async def post_item(request: Request, project_id: RowId, item_id: RowId, user: User = Depends(current_user)):
    form = await request.form()
    check_csrf(request, user, form.get("csrf_token"))
    project = await run_in_threadpool(load_project, request, project_id, user)
    db = request.app.state.db
    back = f"/p/{project_id}/mine" if form.get("return_to") == "mine" else f"/p/{project_id}"
    if form.get("action") == "skip":
        await run_in_threadpool(queue.skip, db, project, user.id, item_id)
        return RedirectResponse(back, status_code=303)
    fields = {key: value for key, value in form.items() if isinstance(value, str)}
    try:
        await run_in_threadpool(queue.submit, db, project, user.id, item_id, fields, fields.get("note"),
                                fields.get("request_id") or uuid.uuid4().hex)
    except AnswerError as exc:
        message = str(exc)

        def again():
            with db.read() as session:
                served = queue.own_item(session, project, user.id, item_id)
            return _label_page(request, user, project, served, values=fields, note=fields.get("note", ""),
                               error=message, return_to=str(form.get("return_to") or "next"), status=422)

        return await run_in_threadpool(again)
    return RedirectResponse(back, status_code=303)


@router.get("/p/{project_id}/mine")
def mine_page(request: Request, project_id: RowId, user: User = Depends(current_user)):
    project = load_project(request, project_id, user)
    with request.app.state.db.read() as session:
        rows = [{"item_id": item.id, "prompt": item.prompt, "note": label.note, "seconds": label.seconds,
                 "answer": summary(project.kind, label.answer, assignment.display_order)}
                for label, item, assignment in queue.own_labels(session, project, user.id)]
    return render(request, "mine.html", {"title": "My labels", "user": user, "project": project, "rows": rows})


@router.get("/p/{project_id}/items/{item_id}/images/{number}")
def item_image(request: Request, project_id: RowId, item_id: RowId, number: int, user: User = Depends(current_user)):
    """An image of an item's prompt, for a member who was served the item (or an admin); else 404."""
    project = load_project(request, project_id, user)
    with request.app.state.db.read() as session:
        if user.is_admin:
            item = session.get(Item, item_id)
            item = item if item is not None and item.project_id == project.id else None
        else:
            item = session.get(Item, queue.own_item(session, project, user.id, item_id).item.id)
        data = stored_image(item, number)
    if data is None:
        raise HTTPException(404, "no such image")
    # never kept by the browser: on a shared machine the next person must not find the images in its cache
    return Response(data, media_type="image/png", headers={"cache-control": "no-store"})
