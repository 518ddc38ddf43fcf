"""The training commands: their options are the fields of a config; their handler calls one ``train_*`` function."""

from __future__ import annotations

import functools
from collections.abc import Callable

from ..config import add_config_arguments, config_from_args
from . import Command

CONFIG_NOTE = " Every option can be set in the YAML file given by --config or by its flag; flags win."


def training_command(name: str, config_cls, train: Callable, help: str, description: str) -> Command:
    """A command that builds ``config_cls`` from YAML and flags and calls ``train(config)``."""
    return Command(name, functools.partial(run_training, config_cls, train),
                   functools.partial(add_config_arguments, cls=config_cls), help, description + CONFIG_NOTE)


def run_training(config_cls, train: Callable, args) -> int:
    from ..runtime.resume import TrainingInterrupted, interruption_message

    cfg = config_from_args(config_cls, args)  # report config mistakes before the heavy imports
    try:
        result = train(cfg)
    except TrainingInterrupted as stop:
        import os
        import sys

        if os.environ.get("RANK", "0") == "0":   # every process stops; the main one says how to go on
            print(interruption_message(stop, getattr(args, "argv", [])), file=sys.stderr, flush=True)
        return stop.exit_code
    if result.is_main_process:
        from rich.console import Console

        out = Console()
        out.print(f"[green]done[/]: model saved to {result.model_dir}")
        out.print(f"metrics written to {result.metrics_file}")
        if (result.run_dir / "samples.jsonl").is_file():
            out.print(f"example generations in {result.run_dir / 'samples.jsonl'}")
    return 0
