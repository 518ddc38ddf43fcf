"""Alembic environment: runs on the connection ``preftune.annotate.db`` hands over (no alembic.ini)."""

from alembic import context

from preftune.annotate.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through preftune.annotate.db.Database.upgrade()")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
