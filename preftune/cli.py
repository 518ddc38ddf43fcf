"""``preftune <command>``: parse the configuration, call the library, report. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from rich.console import Console
from rich.markup import escape

from . import __version__
from .commands import add_training_command
from .config import DPOConfig
from .errors import PreftuneError

err = Console(stderr=True)
out = Console()

# Each module adds its own sub-command(s) with ``register(subparsers)``; a handler takes the parsed
# args and returns an exit code. Imports of heavy libraries happen inside the handlers.
COMMAND_MODULES: tuple[str, ...] = ("preftune.commands.evaluate", "preftune.commands.reward", "preftune.commands.sft",
                                      "preftune.commands.ppo", "preftune.commands.annotate",
                                      "preftune.commands.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Align language models with human preferences.")
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_training_command(commands, "dpo", DPOConfig, "preftune.train.dpo:train_dpo",
                         help="Train a policy on preference pairs (DPO, IPO, SLiC, rDPO, SimPO, soft labels).",
                         description="Direct Preference Optimization and its family.")

    data = commands.add_parser("data", help="Inspect preference datasets.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data_commands.add_parser("check", help="Validate a dataset and report lengths, duplicates and biases.")
    check.add_argument("dataset", help="File, save_to_disk directory or hub name.")
    check.add_argument("--tokenizer", required=True, help="Tokenizer (local directory or hub name) used to count tokens.")
    check.add_argument("--split", default="train", help="Split to read from a directory or hub dataset.")
    check.add_argument("--max_length", type=int, default=1024, help="Maximum prompt + completion tokens.")
    check.add_argument("--max_prompt_length", type=int, default=None, help="Maximum prompt tokens.")
    check.add_argument("--json", action="store_true", help="Print the report as JSON.")
    check.set_defaults(handler=run_data_check)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)

    demo = commands.add_parser("demo", help="Run the built-in controlled-sentiment experiment end to end, offline.")
    demo.add_argument("--output_dir", default="runs/demo", help="Where the demo writes its runs, report.html and summary.json.")
    demo.add_argument("--quick", action="store_true", help="A smaller, faster version (for smoke tests).")
    demo.set_defaults(handler=run_demo)
    return parser


def run_demo(args) -> int:
    from .demo import run_demo as demo

    demo(args.output_dir, quick=args.quick)
    return 0


def run_data_check(args) -> int:
    from .data import TokenizeSettings
    from .data.check import check_dataset, render_report, report_to_dict
    from .models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    settings = TokenizeSettings(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    report = check_dataset(args.dataset, tokenizer, settings, split=args.split)
    if args.json:
        print(json.dumps(report_to_dict(report), indent=2))
    else:
        render_report(report, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_progress()
    try:
        return args.handler(args)
    except PreftuneError as exc:
        err.print("[bold red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


def _quiet_library_progress() -> None:
    """Our own progress display is the one shown; the libraries' per-file bars are noise here."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
