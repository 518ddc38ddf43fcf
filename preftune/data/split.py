"""Held-out splits and the skipped-rows notice shared by every training command."""

from __future__ import annotations

import random

from rich.console import Console

console = Console(stderr=True)


def hold_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded random ``fraction`` of ``items`` held out, both in their original order."""
    if fraction <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, int(round(fraction * len(items))))])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def report_skipped(name: str, report) -> None:
    """One line saying how many rows ``--skip_invalid`` dropped from ``name``, and why."""
    if report.skipped:
        reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(report.skipped.items()))
        console.print(f"[yellow]{name}: skipped {report.total - report.kept} of {report.total} rows ({reasons})")
