"""Server-side browser sessions, project membership, and an index for counting open assignments.

Existing annotators are made members of every existing project, so an upgrade changes nobody's
access; projects created afterwards start with no members (``preftune annotate member add``).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "memberships",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("project_id", "annotator_id", name="uq_memberships_project_annotator"),
    )
    op.create_index("ix_memberships_annotator_id", "memberships", ["annotator_id"])
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("id_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_sessions_annotator_id", "sessions", ["annotator_id"])
    op.create_index("ix_assignments_project_status", "assignments", ["project_id", "status", "served_at"])
    op.execute("INSERT INTO memberships (project_id, annotator_id, created_at) "
               "SELECT projects.id, annotators.id, 0 FROM projects CROSS JOIN annotators WHERE NOT annotators.is_admin")


def downgrade() -> None:
    op.drop_index("ix_assignments_project_status", "assignments")
    op.drop_index("ix_sessions_annotator_id", "sessions")
    op.drop_table("sessions")
    op.drop_index("ix_memberships_annotator_id", "memberships")
    op.drop_table("memberships")
