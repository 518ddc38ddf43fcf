"""A run directory's files, named once, and the JSON-lines records written into it.

Every run writes ``metrics.jsonl`` (one record per logging step) and may write ``samples.jsonl`` (example
generations of the online recipes); ``config.json``, ``summary.json``, ``reference_cache.json``,
``checkpoints/`` and ``model/`` complete it. A resumed run truncates the records after its checkpoint's step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
RECORD_FILES = (METRICS, SAMPLES)                  # appended step by step; truncated on resume
RUN_OUTPUTS = (METRICS, CONFIG, SUMMARY, "reference_cache.json", "checkpoints", "model", SAMPLES)


def finite_or_none(value):
    """``value``, or None for a float NaN or infinity (which JSON cannot hold)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def append_records(path: Path, records: list[dict]) -> None:
    """Append ``records`` to a JSON-lines file, NaN and infinities written as null (valid JSON)."""
    with open(path, "a") as handle:
        handle.writelines(json.dumps({k: finite_or_none(v) for k, v in r.items()}) + "\n" for r in records)


def read_records(path: Path) -> list[dict]:
    """Every record of a JSON-lines file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
