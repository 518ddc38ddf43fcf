"""Image prompts on the labelling page: stored once at import, served by the project's own route.

An import row's images (an ``images`` / ``image`` column, as training data gives them) are checked
like training images (:mod:`preftune.data.images`), shrunk to at most :data:`MAX_SIDE` pixels a side
and re-encoded as PNG: the project needs no file after the import, and what the browser receives is
always a clean, size-limited PNG. Each PNG is stored once in the ``images`` table
(:class:`.models.StoredImage`), keyed by its SHA-256: items that show the same picture share one row,
and an item holds only the digests (``meta["image_digests"]``), so loading an item (to serve it, label
it or export it) never reads picture bytes. ``meta["images"]`` keeps the references as given for the
export, so exported pairs train a vision model.

``GET /p/{project}/items/{item}/images/{n}`` answers a member who was served the item (or an admin)
and 404 to everyone else, with the page's security headers (``img-src 'self'``); the route is in
:mod:`.pages`.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

from sqlalchemy import select

from preftune.data.images import decode_image, image_bytes, image_column
from preftune.data.rows import InvalidRow
from preftune.errors import DataError

from .models import StoredImage

MAX_SIDE = 1024
MAX_IMAGES = 8
MAX_PIXELS = 25_000_000


def _safe_path(source: str, base: Path, value: str, column: str, number: int, index: int) -> None:
    """Refuse absolute paths, ``..`` and symbolic links: an import reads images from beside its file only."""
    path = Path(value)
    where = f"image {index}"
    if path.is_absolute() or value.startswith("~") or ".." in path.parts:
        raise DataError(source, f"{where}: {value!r} must be a path relative to the import file's directory, "
                                "without '..'", row=number, field=column)
    root = base.resolve()
    target = root / path
    for part in [target, *target.parents]:
        if part == root or root not in part.parents:
            break
        if part.is_symlink():
            raise DataError(source, f"{where}: {value!r} passes through a symbolic link", row=number, field=column)


def _check_pixels(source: str, data: bytes, column: str, number: int, index: int) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Exception:  # not an image: decode_image says so properly
        return
    if width * height > MAX_PIXELS:
        raise DataError(source, f"image {index}: {width}x{height} pixels is more than {MAX_PIXELS:,} (a "
                                "decompression bomb, or a picture far larger than a labelling page needs)",
                        row=number, field=column)


def row_images(source: str, row: dict, number: int) -> tuple[dict, dict[str, bytes]]:
    """(``{"images": references, "image_digests": [sha256 hex]}``, ``{digest: PNG bytes}``) for a row with
    images, else ``({}, {})``."""
    column = image_column(row)
    if column is None:
        return {}, {}
    values = row[column] if isinstance(row[column], list) else [row[column]]
    if len(values) > MAX_IMAGES:
        raise DataError(source, f"at most {MAX_IMAGES} images per item, got {len(values)}", row=number, field=column)
    base = Path(source).expanduser().parent
    references, digests, blobs = [], [], {}
    for index, value in enumerate(values, start=1):
        if isinstance(value, dict) and isinstance(value.get("path"), str) and not value.get("bytes"):
            value = value["path"]
        if isinstance(value, str):
            _safe_path(source, base, value, column, number, index)
        try:
            raw = image_bytes(value, base, column, index)
            _check_pixels(source, raw, column, number, index)
            image = decode_image(raw, column, index)
        except InvalidRow as invalid:
            raise invalid.problem(source, number).error from None
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        blobs[digest] = buffer.getvalue()
        digests.append(digest)
        references.append(value if isinstance(value, str) else None)
    return {"images": references, "image_digests": digests}, blobs


def store_images(session, blobs: dict[str, bytes]) -> int:
    """Store the PNGs (``{digest: bytes}``) not stored yet; returns how many were new. An image that another
    import stores at the same moment is kept once (the digest is unique; a clash is skipped)."""
    if not blobs:
        return 0
    known = set()
    digests = list(blobs)
    for start in range(0, len(digests), 500):
        known.update(session.scalars(select(StoredImage.digest).where(
            StoredImage.digest.in_(digests[start:start + 500]))))
    rows = [{"digest": d, "data": blobs[d], "created_at": time.time()} for d in digests if d not in known]
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    for row in rows:
        session.execute(insert(StoredImage).values(**row).on_conflict_do_nothing(index_elements=["digest"]))
    return len(rows)


def image_count(meta: dict | None) -> int:
    return len((meta or {}).get("image_digests") or [])


def export_images(item) -> dict:
    """``{"images": [...]}`` for an exported row when every image of the item has a reference."""
    references = (item.meta or {}).get("images")
    return {"images": references} if references and all(references) else {}


def stored_image(session, item, number: int) -> bytes | None:
    """The PNG bytes of the item's image ``number`` (1-based), or None."""
    digests = (item.meta or {}).get("image_digests") or [] if item is not None else []
    if not 1 <= number <= len(digests):
        return None
    return session.scalar(select(StoredImage.data).where(StoredImage.digest == digests[number - 1]))
