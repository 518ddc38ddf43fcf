"""Helpers the tests share: writing data files and running the command line in a clean environment."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    """``rows`` as JSON lines at ``path``; returns ``path``."""
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON line of ``path`` (metrics.jsonl, samples.jsonl, ...)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def subprocess_env(**extra) -> dict:
    """The environment for a ``preftune`` subprocess: no forced colours, no crash hook unless asked."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "KILL_AT_STEP")}
    env.update({k: str(v) for k, v in extra.items()})
    return env
