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
from fastapi.responses import JSONResponse, Response

from .aggregate import TIE_MODES, export_pairs, export_raw, label_records
from .agreement import annotator_stats, project_agreement
from .members import visible_projects
from .models import Project
from .pages import load_project, render
from .queue import project_progress
from .security import RowId, User, admin_user
from .tokens import list_annotators
from .unpaired import export_kto

router = APIRouter(prefix="/admin")
MAX_MARGIN_SCALE = 1e6


def project_report(session, project: Project) -> dict:
    labels = label_records(session, project)
    return {"id": project.id, "name": project.name, "kind": project.kind, "overlap": project.overlap,
            "scored_with": project.scored_with, "progress": project_progress(session, project),
            "agreement": project_agreement(session, project, labels=labels),
            "stats": annotator_stats(session, project, labels=labels)}


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
                 user: User = Depends(admin)):
    if ties not in TIE_MODES:
        return JSONResponse({"detail": f"ties must be one of {', '.join(TIE_MODES)}"}, 422)
    if not math.isfinite(margin_scale) or margin_scale > MAX_MARGIN_SCALE:
        return JSONResponse({"detail": f"margin_scale must be a number from 0 to {MAX_MARGIN_SCALE:g}"}, 422)

    def pairs(session, project):
        if project.kind == "binary":
            return JSONResponse({"detail": "a binary project has no pairs: export KTO rows (kto.jsonl)"}, 422)
        return export_pairs(session, project, ties=ties, min_votes=min_votes, margin_scale=margin_scale)

    return await _export(request, project_id, "pairs", pairs)


@router.get("/p/{project_id}/kto.jsonl")
async def export_unpaired(request: Request, project_id: RowId, min_agreement: float = Query(0.0, ge=0.0, le=1.0),
                          min_votes: int = Query(1, ge=1, le=1_000_000), user: User = Depends(admin)):
    """Unpaired KTO rows (any question kind): prompt, completion, label, label_prob."""
    return await _export(request, project_id, "kto", lambda session, project: export_kto(
        session, project, min_agreement=min_agreement, min_votes=min_votes))


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
