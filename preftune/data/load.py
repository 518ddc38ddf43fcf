"""Reading raw preference records from local files, saved datasets or the Hugging Face hub.

Every reader returns :class:`Records`: plain Python dicts plus the row number a user would look
up in the source, so that later validation errors can point at the right line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from preftune.errors import DataError

# Extensions that always mean "a local file", even when it does not exist.
FILE_LIKE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst"}
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "text", "response")  # always read as strings


@dataclass
class Records:
    """Raw rows from one source, with the 1-based row number of each as a user would find it."""

    name: str
    rows: list[dict]
    row_numbers: list[int]


def load_records(source: str, split: str = "train") -> Records:
    """Read rows from a JSONL/JSON/parquet/CSV file, a ``save_to_disk`` directory or a hub dataset."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            records = _read_saved_dataset(source, path, split)
        else:
            records = _read_hub(source, split)
    elif path.is_file():
        records = _read_file(source, path)
    elif _looks_like_local_path(source):
        raise DataError(source, "file not found")
    else:
        records = _read_hub(source, split)
    if not records.rows:
        raise DataError(source, "the dataset is empty: no rows found")
    return records


def _looks_like_local_path(source: str) -> bool:
    starts_local = source.startswith(("/", "./", "../", "~", "\\")) or source[1:3] == ":\\"
    return starts_local or Path(source).suffix.lower() in FILE_LIKE_SUFFIXES


def _read_file(source: str, path: Path) -> Records:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        known = ", ".join(sorted(readers))
        raise DataError(source, f"unknown file extension '{path.suffix}': expected one of {known}, "
                                "a directory written by datasets' save_to_disk, or a hub dataset name")
    return reader(source, path)


def read_utf8(source: str, path: Path, header_lines: int | None = 0) -> str:
    """The file as text; a byte that is not UTF-8 is reported with its line and, in a file of one row per
    line, its row: ``header_lines`` lines come before the first row (1 for CSV; None: lines are not rows)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(source, f"cannot read file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        row = line - header_lines if header_lines is not None and line > header_lines else None
        raise DataError(source, f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
                                f"(byte offset {exc.start}; {exc.reason}); save the file as UTF-8", row=row) from None


def _require_object(source: str, value, row: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(source, f"expected a JSON object, found {_json_type(value)}", row=row)
    return value


def _json_type(value) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_jsonl(source: str, path: Path) -> Records:
    return _parse_json_lines(source, read_utf8(source, path))


def _parse_json_lines(source: str, text: str) -> Records:
    rows, numbers = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(source, f"invalid JSON: {exc.msg} (column {exc.colno})", row=line_number) from None
        rows.append(_require_object(source, value, line_number))
        numbers.append(line_number)
    return Records(source, rows, numbers)


def _read_json(source: str, path: Path) -> Records:
    text = read_utf8(source, path, header_lines=None)   # an array: lines are not rows
    if not text.strip():
        return Records(source, [], [])
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if _is_line_delimited(text):
            return _parse_json_lines(source, text)
        raise DataError(source, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    return _records_from_json_value(source, value)


def _is_line_delimited(text: str) -> bool:
    """True when the first non-blank line is a JSON object on its own (JSON lines in a .json file)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _records_from_json_value(source: str, value) -> Records:
    if isinstance(value, dict):
        key = next((k for k in ("data", "rows") if isinstance(value.get(k), list)), None)
        if key is None:
            raise DataError(source, "expected a JSON array of objects, or an object with the rows "
                                    "as a list under 'data' or 'rows'")
        value = value[key]
    if not isinstance(value, list):
        raise DataError(source, f"expected a JSON array of objects, found {_json_type(value)}")
    rows = [_require_object(source, item, index + 1) for index, item in enumerate(value)]
    return Records(source, rows, list(range(1, len(rows) + 1)))


def _read_parquet(source: str, path: Path) -> Records:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(source, f"cannot read parquet file: {exc}") from None
    return Records(source, rows, list(range(1, len(rows) + 1)))


def _read_csv(source: str, path: Path) -> Records:
    """Text columns stay strings; other columns get pandas' type inference; empty cells become None."""
    import io

    import pandas as pd

    text = read_utf8(source, path, header_lines=1)
    try:
        frame = pd.read_csv(io.StringIO(text), dtype={name: str for name in TEXT_COLUMNS},
                            keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise DataError(source, "the dataset is empty: the CSV file has no header or rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(source, f"cannot parse CSV: {exc}") from None
    rows = [_none_for_nan(row) for row in frame.astype(object).to_dict("records")]
    return Records(source, rows, list(range(1, len(rows) + 1)))


def _none_for_nan(row: dict) -> dict:
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()}


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_saved_dataset(source: str, path: Path, split: str) -> Records:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(source, f"cannot read the saved dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(source, f"split '{split}' not found; available splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return _records_from_dataset(source, loaded)


def _read_hub(source: str, split: str) -> Records:
    import datasets

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as exc:
        what = "this data directory" if Path(source).expanduser().is_dir() else "it as a hub dataset"
        raise DataError(source, f"loading {what} (split '{split}') "
                                f"with datasets.load_dataset failed: {exc}") from None
    return _records_from_dataset(source, loaded)


def _records_from_dataset(source: str, dataset) -> Records:
    rows = dataset.to_list()
    return Records(source, rows, list(range(1, len(rows) + 1)))
