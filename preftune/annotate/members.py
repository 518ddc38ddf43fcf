"""Project membership: annotators see and label only the projects they were added to; admins see all."""

from __future__ import annotations

import time

from sqlalchemy import delete, select

from .importer import get_project
from .models import Annotator, Membership, Project
from .tokens import AnnotatorError, get_annotator


def add_member(session, project_name: str, annotator_name: str) -> bool:
    """Add an annotator to a project; False when already a member."""
    project, annotator = get_project(session, project_name), get_annotator(session, annotator_name)
    if annotator.is_admin:
        raise AnnotatorError(f"{annotator_name!r} is an admin and sees every project already")
    if is_member(session, project.id, annotator.id):
        return False
    session.add(Membership(project_id=project.id, annotator_id=annotator.id, created_at=time.time()))
    return True


def remove_member(session, project_name: str, annotator_name: str) -> bool:
    """Take an annotator off a project (their labels stay); False when they were not a member."""
    project, annotator = get_project(session, project_name), get_annotator(session, annotator_name)
    result = session.execute(delete(Membership).where(Membership.project_id == project.id,
                                                      Membership.annotator_id == annotator.id))
    return result.rowcount > 0


def list_members(session, project_name: str) -> list[str]:
    project = get_project(session, project_name)
    return list(session.scalars(select(Annotator.name).join(Membership, Membership.annotator_id == Annotator.id)
                                .where(Membership.project_id == project.id).order_by(Annotator.name)))


def is_member(session, project_id: int, annotator_id: int) -> bool:
    return session.scalar(select(Membership.id).where(Membership.project_id == project_id,
                                                      Membership.annotator_id == annotator_id)) is not None


def visible_projects(session, annotator_id: int, is_admin: bool) -> list[Project]:
    """The projects this person may see, by name."""
    query = select(Project).order_by(Project.name)
    if not is_admin:
        query = query.join(Membership, Membership.project_id == Project.id).where(
            Membership.annotator_id == annotator_id)
    return list(session.scalars(query))
