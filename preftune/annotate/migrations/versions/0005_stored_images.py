"""Images stored once, in their own table, keyed by their SHA-256; items keep the digests.

Upgrade moves every item's inline ``meta["image_data"]`` (base64 PNGs) into the ``images`` table (one
row per distinct picture) and leaves ``meta["image_digests"]`` in its place; downgrade puts the base64
data back into each item and drops the table.

Revision ID: 0005
Revises: 0004
"""

import base64
import hashlib
import time

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BATCH = 10  # items read at once: an item may hold up to 8 inline images of a few MB each
items = sa.table("items", sa.column("id", sa.Integer), sa.column("meta", sa.JSON))
images = sa.table("images", sa.column("id", sa.Integer), sa.column("digest", sa.String),
                  sa.column("data", sa.LargeBinary), sa.column("created_at", sa.Float))


def _items_with(connection, key: str):
    """(id, meta) of the items whose meta holds ``key``, in batches (an item's images are read once)."""
    last = 0
    marker = sa.cast(items.c.meta, sa.Text).like(f'%"{key}"%')
    while True:
        rows = connection.execute(sa.select(items.c.id, items.c.meta).where(items.c.id > last, marker)
                                  .order_by(items.c.id).limit(BATCH)).all()
        if not rows:
            return
        for item_id, meta in rows:
            if isinstance(meta, dict) and key in meta:
                yield item_id, meta
        last = rows[-1][0]


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("digest", name="uq_images_digest"),
    )
    connection = op.get_bind()
    stored: set[str] = set()
    for item_id, meta in _items_with(connection, "image_data"):
        digests = []
        for encoded in meta.pop("image_data") or []:
            data = base64.b64decode(encoded)
            digest = hashlib.sha256(data).hexdigest()
            if digest not in stored:
                connection.execute(images.insert().values(digest=digest, data=data, created_at=time.time()))
                stored.add(digest)
            digests.append(digest)
        meta["image_digests"] = digests
        connection.execute(items.update().where(items.c.id == item_id).values(meta=meta))


def downgrade() -> None:
    connection = op.get_bind()
    for item_id, meta in _items_with(connection, "image_digests"):
        data = []
        for digest in meta.pop("image_digests") or []:
            found = connection.scalar(sa.select(images.c.data).where(images.c.digest == digest))
            if found is None:
                raise RuntimeError(f"item {item_id}: image {digest} is missing from the images table")
            data.append(base64.b64encode(found).decode("ascii"))
        meta["image_data"] = data
        connection.execute(items.update().where(items.c.id == item_id).values(meta=meta))
    op.drop_table("images")
