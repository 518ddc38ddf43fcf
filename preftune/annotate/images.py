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
        data.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        references.append(value if isinstance(value, str) else None)
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
