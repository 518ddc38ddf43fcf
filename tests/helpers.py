"""Helpers the tests share: writing data files and running the command line in a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def start_cli(*args, env_extra=None) -> subprocess.Popen:
    """``python -m preftune.cli *args`` started in the background (one thread, offline, no crash hook unless
    ``env_extra`` sets ``KILL_AT_STEP``), its output piped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("KILL_AT_STEP", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
