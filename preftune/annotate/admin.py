"""Admin routes (admin token only): progress, agreement, per-annotator statistics, exports."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from .aggregate import TIE_MODES, export_pairs, export_raw
from .agreement import annotator_stats, project_agreement
from .pages import load_project, render
from .queue import project_progress
from .models import Project
from .security import User, admin_user
from .tokens import list_annotators

router = APIRouter(prefix="/admin")


def project_report(session, project: Project) -> dict:
    return {"id": project.id, "name": project.name, "kind": project.kind, "overlap": project.overlap,
            "scored_with": project.scored_with, "progress": project_progress(session, project),
            "agreement": project_agreement(session, project), "stats": annotator_stats(session, project)}


@router.get("")
def dashboard(request: Request, user: User = Depends(admin_user)):
    with request.app.state.db.read() as session:
        projects = [project_report(session, p) for p in session.scalars(select(Project).order_by(Project.name))]
        annotators = list_annotators(session)
    return render(request, "admin.html", {"title": "Admin", "user": user, "projects": projects,
                                          "annotators": annotators})


def _jsonl(rows: list[dict], filename: str) -> Response:
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return Response(body, media_type="application/x-ndjson",
                    headers={"content-disposition": f'attachment; filename="{filename}"'})


def _filename(project: Project, suffix: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in project.name)
    return f"{safe}-{suffix}.jsonl"


@router.get("/p/{project_id}/export.jsonl")
def export(request: Request, project_id: int, ties: str = "drop", min_votes: int = 1, margin_scale: float = 0.0,
           user: User = Depends(admin_user)):
    if ties not in TIE_MODES:
        return JSONResponse({"detail": f"ties must be one of {', '.join(TIE_MODES)}"}, 422)
    project = load_project(request, project_id)
    with request.app.state.db.read() as session:
        rows = export_pairs(session, project, ties=ties, min_votes=max(1, min_votes), margin_scale=margin_scale)
    return _jsonl(rows, _filename(project, "pairs"))


@router.get("/p/{project_id}/labels.jsonl")
def labels(request: Request, project_id: int, user: User = Depends(admin_user)):
    project = load_project(request, project_id)
    with request.app.state.db.read() as session:
        rows = export_raw(session, project)
    return _jsonl(rows, _filename(project, "labels"))


@router.get("/p/{project_id}/stats.json")
def stats(request: Request, project_id: int, user: User = Depends(admin_user)):
    project = load_project(request, project_id)
    with request.app.state.db.read() as session:
        return project_report(session, project)
