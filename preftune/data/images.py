"""Images in rows: reading them, checking them, and the image parts of chat messages.

A row carries its images in an ``images`` column (or ``image`` for a single one), as TRL's vision
datasets do. Each image is a path (relative to the data file's folder, or absolute), raw bytes, a
``{"bytes", "path"}`` object (how ``datasets`` stores an ``Image`` column) or a PIL image. Where the
images go in the prompt is said by ``{"type": "image"}`` parts inside message contents; a
conversation without such parts gets one part per image at the start of its first user message.

Validation raises :class:`~preftune.data.rows.InvalidRow` (the reader adds file and row): a missing or
unreadable image, an image mode that cannot become RGB, or a count of image parts that does not
match the count of images.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from preftune.data.rows import InvalidRow, type_name

IMAGE_COLUMNS = ("images", "image")
# Modes that convert to RGB without losing their meaning; 16/32-bit and float modes do not.
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
MAX_IMAGE_BYTES = 64 * 1024 * 1024


@dataclass
class RowImages:
    """A row's images, decoded to RGB, and a digest of their bytes (for caches keyed on the data)."""

    images: list
    digest: str

    def __len__(self) -> int:
        return len(self.images)


def image_column(row: dict) -> str | None:
    return next((name for name in IMAGE_COLUMNS if row.get(name) not in (None, [])), None)


def has_images(rows: list[dict]) -> bool:
    """True when any row has an image column or an image part in its messages."""
    return any(image_column(row) or any(count_parts(row.get(k)) for k in ("prompt", "messages", "chosen"))
               for row in rows)


def uses_images(cfg) -> bool:
    """True when a config's training data has an image column or image parts (read before any model loads)."""
    from preftune.data.load import load_records

    return has_images(load_records(cfg.dataset, split=cfg.split).rows)


def read_row_images(row: dict, base_dir: Path | None) -> RowImages:
    """The row's images, opened and converted to RGB; paths are relative to ``base_dir``."""
    column = image_column(row)
    if column is None:
        return RowImages([], hashlib.sha256(b"").hexdigest())
    values = row[column] if isinstance(row[column], (list, tuple)) else [row[column]]
    digest = hashlib.sha256()
    images = []
    for number, value in enumerate(values, start=1):
        data = image_bytes(value, base_dir, column, number)
        digest.update(len(data).to_bytes(8, "little") + data)
        images.append(decode_image(data, column, number))
    return RowImages(images, digest.hexdigest())


def image_bytes(value, base_dir: Path | None, column: str, number: int) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return _read_file(value, base_dir, column, number)
    if hasattr(value, "save") and hasattr(value, "mode"):   # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidRow("bad image", column, f"image {number}: expected a path, bytes or an image, found "
                                          f"{type_name(value)}")


def _read_file(value: str, base_dir: Path | None, column: str, number: int) -> bytes:
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise InvalidRow("missing image", column, f"image {number}: file not found: {path}")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise InvalidRow("bad image", column, f"image {number}: {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    return path.read_bytes()


def decode_image(data: bytes, column: str, number: int):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRow("unreadable image", column, f"image {number}: cannot be read as an image ({exc})") from None
    if image.mode not in CONVERTIBLE_MODES:
        raise InvalidRow("unsupported image mode", column,
                         f"image {number}: unsupported mode {image.mode!r}; use an 8-bit image "
                         f"({', '.join(CONVERTIBLE_MODES[:7])}, ...)")
    return image.convert("RGB")


# ---------------------------------------------------------------- image parts in messages


def count_parts(messages) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


def check_parts(field: str, messages: list[dict]) -> None:
    """Message contents are strings or lists of ``{"type": "text", "text"}`` / ``{"type": "image"}`` parts."""
    for number, message in enumerate(messages, start=1):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image" or (kind == "text" and isinstance(part.get("text"), str)):
                continue
            raise InvalidRow("bad message", field, f"message {number}: a content part must be "
                                                   "{\"type\": \"text\", \"text\": ...} or {\"type\": \"image\"}, "
                                                   f"found {part!r:.80}")


def place_images(prompt: list[dict], count: int, column: str = "images") -> list[dict]:
    """The prompt messages with exactly ``count`` image parts: as given, or added to the first user message."""
    check_parts("prompt", prompt)
    found = count_parts(prompt)
    if found == 0 and count:
        first = next((i for i, m in enumerate(prompt) if m.get("role") == "user"), 0)
        message = prompt[first]
        text = message["content"]
        parts = text if isinstance(text, list) else [{"type": "text", "text": text}]
        prompt = [*prompt[:first], {**message, "content": [{"type": "image"}] * count + parts}, *prompt[first + 1:]]
        found = count
    if found != count:
        raise InvalidRow("image count", column, f"the prompt has {found} image placeholder(s) but the row has "
                                                f"{count} image(s)")
    return prompt


def text_only(messages: list[dict]) -> list[dict]:
    """Messages with list contents flattened to their text (for replies, which never hold images)."""
    return [{**m, "content": "".join(p.get("text") or "" for p in m["content"] if isinstance(p, dict))}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages]
