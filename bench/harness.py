"""What every benchmark script here shares: the hidden worker mode (each trainer runs in its own
process) and the results table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser, lr: float) -> None:
    """The shape of the Llama both trainers get, and their learning rate."""
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=lr)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` for the report, and the hidden options a script passes to its own worker processes."""
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


def run_worker(args, workers: dict, threads: int | None = None) -> bool:
    """In a worker process: run ``workers[args.worker]``, write its result to ``OUT/bench.json`` and return True."""
    if not args.worker:
        return False
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    assets = json.loads(Path(args.assets).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = workers[args.worker](args, assets, out)
    (out / "bench.json").write_text(json.dumps(result))
    return True


def results_table(title: str, results: dict[str, dict], columns: list[str], fmt=lambda column, value: f"{value:.2f}"):
    """A rich table: one row per trainer, one column per figure."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("trainer")
    for column in columns:
        table.add_column(column, justify="right")
    for name, figures in results.items():
        table.add_row(name, *(fmt(column, figures[column]) for column in columns))
    return table
