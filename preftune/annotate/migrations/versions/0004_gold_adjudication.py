"""Gold items (a known answer, served at the project's gold rate) and adjudications of disputed items.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("gold_rate", sa.Float, nullable=False, server_default="0"))
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("is_gold", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("gold", sa.JSON, nullable=True))
    op.create_index("ix_items_project_gold", "items", ["project_id", "is_gold", "random_key"])
    op.create_table(
        "adjudications",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id"), nullable=False),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id"), nullable=False),
        sa.Column("answer", sa.JSON, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("item_id", name="uq_adjudications_item"),
    )
    op.create_index("ix_adjudications_project_id", "adjudications", ["project_id"])


def downgrade() -> None:
    op.drop_index("ix_adjudications_project_id", "adjudications")
    op.drop_table("adjudications")
    op.drop_index("ix_items_project_gold", "items")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("gold")
        batch.drop_column("is_gold")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("gold_rate")
