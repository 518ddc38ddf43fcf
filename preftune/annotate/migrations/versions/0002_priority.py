"""Serving order: a per-item priority (active learning; smaller is asked first), the model that set it,
and a flag for items that have all their labels (so the queue skips them through an index).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("priority", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("complete", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.drop_index("ix_items_project_random")
        batch.create_index("ix_items_project_order", ["project_id", "complete", "priority", "random_key"])
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("scored_with", sa.String(500), nullable=True))
    op.execute("UPDATE items SET complete = ((SELECT count(*) FROM labels WHERE labels.item_id = items.id) "
               ">= (SELECT overlap FROM projects WHERE projects.id = items.project_id))")


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("scored_with")
    with op.batch_alter_table("items") as batch:
        batch.drop_index("ix_items_project_order")
        batch.create_index("ix_items_project_random", ["project_id", "random_key"])
        batch.drop_column("complete")
        batch.drop_column("priority")
