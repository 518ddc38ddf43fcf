"""Active learning: serve first the items whose candidates a reward model separates least.

A scorer is a :mod:`preftune.scoring` scorer or any callable ``scorer(prompts, responses) -> scores``
(its scores pass the same checks as every scorer's). An item's priority is the smallest score gap
between two of its candidates (the pair the model is least sure of); the queue serves small
priorities first. ``RewardModelWatcher`` re-ranks every project when the reward model
on disk changes (for example after it was retrained on the newest labels).
"""

from __future__ import annotations

import threading
from itertools import combinations
from pathlib import Path
from typing import Callable

from rich.console import Console
from sqlalchemy import select, update

from preftune.scoring import Scorer, as_scorer

from .models import Item, Project

console = Console(stderr=True)


def least_separated(scores: list[float]) -> float:
    """The smallest gap between any two candidates' scores (one candidate: its distance from 0)."""
    if len(scores) == 1:
        return abs(scores[0])
    return min(abs(a - b) for a, b in combinations(scores, 2))


def rerank_project(db, project_name: str, scorer: Scorer | Callable, source: str = "scorer", chunk: int = 256) -> int:
    """Score every candidate of a project's items and store each item's priority; returns items scored.

    An item imported with a conversation as its prompt is scored on those messages (``meta["prompt_messages"]``).
    """
    scorer = as_scorer(scorer, "scorer")
    with db.read() as session:
        project = session.scalar(select(Project).where(Project.name == project_name))
        items = session.execute(select(Item.id, Item.prompt, Item.candidates, Item.meta)
                                .where(Item.project_id == project.id).order_by(Item.id)).all()
    done = 0
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        prompts = [(meta or {}).get("prompt_messages") or prompt for _, prompt, candidates, meta in part
                   for _ in candidates]
        responses = [text for _, _, candidates, _ in part for text in candidates]
        scores = scorer.score(prompts, responses)
        priorities, at = [], 0
        for item_id, _, candidates, _ in part:
            priorities.append((item_id, least_separated(scores[at:at + len(candidates)])))
            at += len(candidates)
        with db.write() as session:
            for item_id, priority in priorities:
                session.execute(update(Item).where(Item.id == item_id).values(priority=priority))
        done += len(part)
    with db.write() as session:
        session.execute(update(Project).where(Project.name == project_name).values(scored_with=source[:500]))
    return done


def rerank_all(db, scorer: Scorer | Callable, source: str) -> int:
    with db.read() as session:
        names = list(session.scalars(select(Project.name).order_by(Project.id)))
    return sum(rerank_project(db, name, scorer, source) for name in names)


def reward_model_scorer(path: str, batch_size: int = 16, device: str | None = None) -> Scorer:
    """A scorer backed by a reward model trained with ``preftune reward``."""
    from preftune.scoring.reward_model import RewardModelScorer

    return RewardModelScorer(path, device=device, batch_size=batch_size)


def model_version(path: str) -> float | None:
    """The newest modification time of a model file or directory (None when it does not exist)."""
    target = Path(path)
    if not target.exists():
        return None
    if target.is_file():
        return target.stat().st_mtime
    times = [entry.stat().st_mtime for entry in target.rglob("*") if entry.is_file()]
    return max(times, default=target.stat().st_mtime)


class RewardModelWatcher:
    """Re-rank the queue with the reward model at ``path`` now, and again whenever it changes on disk."""

    def __init__(self, db, path: str, load_scorer: Callable[[str], Scorer] = reward_model_scorer,
                 interval: float = 60.0):
        self.db, self.path, self.load_scorer, self.interval = db, path, load_scorer, interval
        self.version: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> bool:
        """Re-rank if the model changed since the last ranking; True when it re-ranked."""
        version = model_version(self.path)
        if version is None or version == self.version:
            return False
        scorer = self.load_scorer(self.path)
        count = rerank_all(self.db, scorer, f"{self.path}@{version:.0f}")
        self.version = version
        console.print(f"re-ranked {count} items with the reward model {self.path}")
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception as exc:  # keep serving in the old order; say why
                console.print(f"[yellow]could not re-rank with {self.path}: {exc}")
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reward-model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
