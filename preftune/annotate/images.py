"""Image prompts on the labelling page: stored with the item at import, served by the project's own route.

An import row's images (an ``images`` / ``image`` column, as training data gives them) are checked
like training images (:mod:`preftune.data.images`), shrunk to at most :data:`MAX_SIDE` pixels a side
and re-encoded as PNG into the item's ``meta["image_data"]``: the project needs no file after the
import, and what the browser receives is always a clean, size-limited PNG. ``meta["images"]`` keeps
the references as given (paths made absolute) for the export, so exported pairs train a vision model.

``GET /p/{project}/items/{item}/images/{n}`` answers a member who was served the item (or an admin)
and 404 to everyone else, with the page's security headers (``img-src 'self'``); the route is in
:mod:`.pages`.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from preftune.data.images import decode_image, image_bytes, image_column
from preftune.data.rows import InvalidRow
from preftune.errors import DataError

MAX_SIDE = 1024
MAX_IMAGES = 8


def row_images(source: str, row: dict, number: int) -> dict:
    """``{"images": references, "image_data": [base64 PNG]}`` for a row with images, else ``{}``."""
    column = image_column(row)
    if column is None:
        return {}
    values = row[column] if isinstance(row[column], list) else [row[column]]
    if len(values) > MAX_IMAGES:
        raise DataError(source, f"at most {MAX_IMAGES} images per item, got {len(values)}", row=number, field=column)
    base = Path(source).expanduser().parent
    references, data = [], []
    for index, value in enumerate(values, start=1):
        try:
            image = decode_image(image_bytes(value, base, column, index), column, index)
        except InvalidRow as invalid:
            raise invalid.problem(source, number).error from None
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        references.append(str((base / value).resolve()) if isinstance(value, str) else None)
    return {"images": references, "image_data": data}


def image_count(meta: dict | None) -> int:
    return len((meta or {}).get("image_data") or [])


def export_images(item) -> dict:
    """``{"images": [...]}`` for an exported row when every image of the item has a reference."""
    references = (item.meta or {}).get("images")
    return {"images": references} if references and all(references) else {}


def stored_image(item, number: int) -> bytes | None:
    """The PNG bytes of the item's image ``number`` (1-based), or None."""
    images = (item.meta or {}).get("image_data") or [] if item is not None else []
    return base64.b64decode(images[number - 1]) if 1 <= number <= len(images) else None
