"""The tables. Every change here needs a migration in ``migrations/versions`` (a test checks they agree).

Times are Unix seconds (floats) so that SQLite and PostgreSQL compare them the same way.
Answers are stored in the candidates' canonical order; ``Assignment.display_order`` records the
order one annotator saw them in (position-bias control).
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

KINDS = ("pairwise", "ranking", "rating", "binary")


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    allow_notes: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float)
    scored_with: Mapped[str | None] = mapped_column(String(500), nullable=True)
    gold_rate: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")  # share of serves that are gold


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("project_id", "external_id", name="uq_items_project_external"),
        Index("ix_items_project_order", "project_id", "complete", "priority", "random_key"),
        Index("ix_items_project_gold", "project_id", "is_gold", "random_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    external_id: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    candidates: Mapped[list] = mapped_column(JSON)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    random_key: Mapped[float] = mapped_column(Float)
    priority: Mapped[float] = mapped_column(Float, default=0.0)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)  # has all the labels its project wants
    created_at: Mapped[float] = mapped_column(Float)
    # a gold item has a known answer (canonical form, as a label's); it is served to every member once, at the
    # project's gold_rate, and is always "complete" so the ordinary queue never serves it
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    gold: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class Annotator(Base):
    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float)


class Assignment(Base):
    """One item served to one annotator: the order they saw the candidates in, and what became of it."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "annotator_id", name="uq_assignments_item_annotator"),
        Index("ix_assignments_annotator_status", "annotator_id", "project_id", "status"),
        Index("ix_assignments_project_status", "project_id", "status", "served_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    display_order: Mapped[list] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(10), default="open")  # open, done, skipped, expired
    served_at: Mapped[float] = mapped_column(Float)


class Label(Base):
    """An annotator's judgement of one item. ``request_id`` makes client retries idempotent."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("item_id", "annotator_id", name="uq_labels_item_annotator"),
        UniqueConstraint("annotator_id", "request_id", name="uq_labels_annotator_request"),
        Index("ix_labels_project", "project_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    answer: Mapped[dict] = mapped_column(JSON)
    note: Mapped[str] = mapped_column(Text, default="")
    request_id: Mapped[str] = mapped_column(String(100))
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Membership(Base):
    """An annotator may see and label a project only when added to it (admins see every project)."""

    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("project_id", "annotator_id", name="uq_memberships_project_annotator"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float)


class LoginSession(Base):
    """A browser session: the cookie holds a random id; only its SHA-256 hash is stored here."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id_hash: Mapped[str] = mapped_column(String(64), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class Adjudication(Base):
    """An admin's resolution of a disputed item, kept beside (never over) the annotators' labels.

    ``answer`` is in canonical candidate order, like a label's; exports and the competence model treat it
    as the item's known answer.
    """

    __tablename__ = "adjudications"
    __table_args__ = (UniqueConstraint("item_id", name="uq_adjudications_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))  # who resolved it
    answer: Mapped[dict] = mapped_column(JSON)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
