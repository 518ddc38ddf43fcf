"""Admin routes (admin token only): progress, agreement, per-annotator statistics, exports.

Reports count in SQL (progress) and read label rows only, never a project's items; exports read the
labelled items. Admin work runs on its own small thread pool (``ServerSettings.admin_threads``), so
however many reports are asked for at once, annotators' requests keep their own threads; and a report
is reused for ``ServerSettings.report_seconds`` (a dashboard left reloading costs one report per period).
"""

from __future__ import annotations

import json
import math
import time
from urllib.parse import quote

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import select

from .adjudication import DISPUTE_THRESHOLD, adjudicate, disputed_items, item_labels
from .aggregate import TIE_MODES, WEIGHTINGS, export_pairs, export_raw, gold_results, label_records, project_competence
from .agreement import annotator_stats, project_agreement
from .answers import LETTERS, summary
from .api import _json_body as api_body
from .members import visible_projects
from .models import Adjudication, Item, Project
from .pages import load_project, render
from .queue import project_progress
from .security import RowId, User, admin_user, check_csrf
from .tokens import list_annotators
from .unpaired import export_kto

router = APIRouter(prefix="/admin")
MAX_MARGIN_SCALE = 1e6
MAX_DISPUTES_SHOWN = 200
THRESHOLD = Query(DISPUTE_THRESHOLD, gt=0.0, le=1.0)


def project_report(session, project: Project) -> dict:
    """Progress, agreement, competences (with their uncertainty and flags) and per-annotator statistics,
    gold accuracy included."""
    labels = label_records(session, project)
    model = project_competence(session, project, labels)[0]
    gold = gold_results(session, project, labels)
    stats = annotator_stats(session, project, labels=labels)
    for row in stats:
        right, total = gold.get(row["annotator"], (0, 0))
        row["gold_accuracy"], row["gold_compared"] = (right / total if total else None), total
        found = model.annotators.get(row["annotator"])
        row["competence"] = found.as_dict() if found else None
    competences = sorted((c.as_dict() for c in model.annotators.values()), key=lambda c: c["annotator"])
    return {"id": project.id, "name": project.name, "kind": project.kind, "overlap": project.overlap,
            "gold_rate": project.gold_rate, "scored_with": project.scored_with,
            "progress": project_progress(session, project),
            "agreement": project_agreement(session, project, labels=labels),
            "competence": {"model": "one-coin Dawid-Skene (gold items and adjudications anchor it)",
                           "prior": round(model.prior, 4), "annotators": competences,
                           "flagged": [c["annotator"] for c in competences if c["flag"]]},
            "disputed_items": len(disputed_items(session, project, labels=labels)),
            "stats": stats}


async def _admin_work(request: Request, work):
    """Run ``work()`` on the admin threads (never on the annotators')."""
    return await anyio.to_thread.run_sync(work, limiter=request.app.state.admin_limiter)


async def admin(request: Request) -> User:
    """FastAPI dependency: ``admin_user``, checked on the admin threads too."""
    return await _admin_work(request, lambda: admin_user(request))


def _recent(request: Request, key, compute):
    """``compute()``, or its result from less than ``report_seconds`` ago (on the admin threads)."""
    cache, now = request.app.state.report_cache, time.monotonic()
    found = cache.get(key)
    if found is not None and now - found[0] < request.app.state.settings.report_seconds:
        return found[1]
    value = compute()
    cache[key] = (time.monotonic(), value)
    return value


@router.get("")
async def dashboard(request: Request, user: User = Depends(admin)):
    def report():
        with request.app.state.db.read() as session:
            projects = [project_report(session, p) for p in visible_projects(session, user.id, True)]
            annotators = list_annotators(session)
        return {"projects": projects, "annotators": annotators}

    context = await _admin_work(request, lambda: _recent(request, "dashboard", report))
    return render(request, "admin.html", {"title": "Admin", "user": user, **context})


def download_name(name: str) -> str:
    """A Content-Disposition value (RFC 6266): an ASCII ``filename`` and the exact UTF-8 ``filename*`` (RFC 5987)."""
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _jsonl(rows: list[dict], filename: str) -> Response:
    body = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    return Response(body, media_type="application/x-ndjson", headers={"content-disposition": download_name(filename)})


def _filename(project: Project, suffix: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in project.name)
    return f"{safe}-{suffix}.jsonl"


@router.get("/p/{project_id}/export.jsonl")
async def export(request: Request, project_id: RowId, ties: str = "drop",
                 min_votes: int = Query(1, ge=1, le=1_000_000), margin_scale: float = Query(0.0, ge=0.0),
                 weighting: str = "competence", user: User = Depends(admin)):
    if ties not in TIE_MODES:
        return JSONResponse({"detail": f"ties must be one of {', '.join(TIE_MODES)}"}, 422)
    if weighting not in WEIGHTINGS:
        return JSONResponse({"detail": f"weighting must be one of {', '.join(WEIGHTINGS)}"}, 422)
    if not math.isfinite(margin_scale) or margin_scale > MAX_MARGIN_SCALE:
        return JSONResponse({"detail": f"margin_scale must be a number from 0 to {MAX_MARGIN_SCALE:g}"}, 422)

    def pairs(session, project):
        if project.kind == "binary":
            return JSONResponse({"detail": "a binary project has no pairs: export KTO rows (kto.jsonl)"}, 422)
        return export_pairs(session, project, ties=ties, min_votes=min_votes, margin_scale=margin_scale,
                            weighting=weighting)

    return await _export(request, project_id, "pairs", pairs)


@router.get("/p/{project_id}/kto.jsonl")
async def export_unpaired(request: Request, project_id: RowId, min_agreement: float = Query(0.0, ge=0.0, le=1.0),
                          min_votes: int = Query(1, ge=1, le=1_000_000), weighting: str = "competence",
                          user: User = Depends(admin)):
    """Unpaired KTO rows (any question kind): prompt, completion, label, label_prob, weight."""
    if weighting not in WEIGHTINGS:
        return JSONResponse({"detail": f"weighting must be one of {', '.join(WEIGHTINGS)}"}, 422)
    return await _export(request, project_id, "kto", lambda session, project: export_kto(
        session, project, min_agreement=min_agreement, min_votes=min_votes, weighting=weighting))


@router.get("/p/{project_id}/labels.jsonl")
async def labels(request: Request, project_id: RowId, user: User = Depends(admin)):
    return await _export(request, project_id, "labels", export_raw)


async def _export(request: Request, project_id: int, suffix: str, rows_of) -> Response:
    """A project's rows, ``rows_of(session, project)``, as a JSONL download (on the admin threads); ``rows_of``
    may answer with a response of its own instead (a refusal)."""
    def rows():
        project = load_project(request, project_id)
        with request.app.state.db.read() as session:
            found = rows_of(session, project)
        return found if isinstance(found, Response) else _jsonl(found, _filename(project, suffix))

    return await _admin_work(request, rows)


@router.get("/p/{project_id}/stats.json")
async def stats(request: Request, project_id: RowId, user: User = Depends(admin)):
    def report():
        project = load_project(request, project_id)
        with request.app.state.db.read() as session:
            return project_report(session, project)

    return JSONResponse(await _admin_work(request, lambda: _recent(request, project_id, report)))


@router.get("/p/{project_id}/disputes.json")
async def disputes_json(request: Request, project_id: RowId, threshold: float = THRESHOLD,
                        user: User = Depends(admin)):
    """The disputed items (see :mod:`.adjudication`), least agreement first, resolved ones last."""
    def report():
        project = load_project(request, project_id)
        with request.app.state.db.read() as session:
            return disputed_items(session, project, threshold)

    return JSONResponse(await _admin_work(request, report))


@router.get("/p/{project_id}/disputes")
async def disputes_page(request: Request, project_id: RowId, threshold: float = THRESHOLD,
                        user: User = Depends(admin)):
    """The adjudication queue: each disputed item with its labels and a form to resolve it."""
    def report():
        project = load_project(request, project_id)
        with request.app.state.db.read() as session:
            found = disputed_items(session, project, threshold)[:MAX_DISPUTES_SHOWN]
            items = {item.id: item for item in session.scalars(select(Item).where(
                Item.id.in_([d["item_id"] for d in found])))}
            resolved = {a.item_id: a for a in session.scalars(select(Adjudication).where(
                Adjudication.item_id.in_(list(items))))}
            rows = [{**d, "prompt": items[d["item_id"]].prompt,
                     "shown": [(LETTERS[i], text) for i, text in enumerate(items[d["item_id"]].candidates)],
                     "labels": item_labels(session, project, d["item_id"]),
                     "resolution": summary(project.kind, resolved[d["item_id"]].answer,
                                           list(range(len(items[d["item_id"]].candidates))))
                     if d["item_id"] in resolved else None} for d in found]
        return project, rows

    project, rows = await _admin_work(request, report)
    return render(request, "disputes.html", {"title": f"Disputes · {project.name}", "user": user, "project": project,
                                             "rows": rows, "threshold": threshold})


@router.post("/p/{project_id}/items/{item_id}/adjudicate")
async def post_adjudication(request: Request, project_id: RowId, item_id: RowId, user: User = Depends(admin)):
    """Resolve a disputed item: form fields as on the labelling page (``choice``, ``ranking``, ``scores``,
    ``thumb``), the candidates lettered in their canonical order; a JSON body works too (bearer token)."""
    if request.headers.get("content-type", "").startswith("application/json"):
        fields = await api_body(request)
        submitted = request.headers.get("x-csrf-token")
    else:
        form = await request.form()
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        submitted = fields.get("csrf_token")
    check_csrf(request, user, submitted)

    def store():
        project = load_project(request, project_id)
        with request.app.state.db.write() as session:
            try:
                found = adjudicate(session, project, item_id, user.id, fields, fields.get("note"))
            except LookupError:
                return JSONResponse({"detail": "no such item"}, 404)
            return found.id

    stored = await _admin_work(request, store)
    if isinstance(stored, Response):
        return stored
    if request.headers.get("content-type", "").startswith("application/json"):
        return JSONResponse({"adjudication_id": stored, "item_id": item_id})
    return RedirectResponse(f"/admin/p/{project_id}/disputes", status_code=303)
