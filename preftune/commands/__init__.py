"""Sub-commands beyond the core ones in ``preftune.cli``; each module exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse
import functools
import importlib

from ..config import add_config_arguments, config_from_args

CONFIG_NOTE = " Every option can be set in the YAML file given by --config or by its flag; flags win."


def add_training_command(subparsers, name: str, config_cls, train: str, help: str, description: str) -> None:
    """A command whose options are the fields of ``config_cls`` and which calls ``train`` ('module:function')."""
    parser = subparsers.add_parser(name, help=help, description=description + CONFIG_NOTE,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser, config_cls)
    parser.set_defaults(handler=functools.partial(run_training, config_cls, train))


def run_training(config_cls, train: str, args) -> int:
    cfg = config_from_args(config_cls, args)  # report config mistakes before the heavy imports
    module, function = train.split(":")
    result = getattr(importlib.import_module(module), function)(cfg)
    if result.is_main_process:
        from rich.console import Console

        out = Console()
        out.print(f"[green]done[/]: model saved to {result.model_dir}")
        out.print(f"metrics written to {result.metrics_file}")
        if (result.run_dir / "samples.jsonl").is_file():
            out.print(f"example generations in {result.run_dir / 'samples.jsonl'}")
    return 0
