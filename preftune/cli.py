"""``preftune <command>``: parse the configuration, call the library, report. Nothing else lives here.

The commands, their arguments and their handlers are listed in :mod:`preftune.commands.table`.
"""

from __future__ import annotations

import argparse
import difflib
import sys

from rich.console import Console
from rich.markup import escape

from . import __version__
from .commands import HelpFormatter
from .commands.table import COMMANDS, GROUPS
from .errors import PreftuneError

err = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Align language models with human preferences.",
                                     formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    groups = {(): parser.add_subparsers(dest="command", required=True, metavar="COMMAND")}
    for command in COMMANDS:
        *group, name = command.name.split()
        sub = _group(groups, tuple(group)).add_parser(name, help=command.help, formatter_class=HelpFormatter,
                                                      description=command.description or command.help,
                                                      allow_abbrev=False)   # --learning_rat is a typo, not a prefix
        command.arguments(sub)
        sub.set_defaults(handler=command.run, parser=sub)
    return parser


def _group(groups: dict, path: tuple[str, ...]):
    """The sub-parsers of the group ``path`` ("annotate", "token"), made (with its parents) on first use."""
    if path not in groups:
        help, description = GROUPS[" ".join(path)]
        group = _group(groups, path[:-1]).add_parser(path[-1], help=help, description=description or help,
                                                     formatter_class=HelpFormatter, allow_abbrev=False)
        groups[path] = group.add_subparsers(dest=f"{path[-1]}_command", required=True, metavar="SUBCOMMAND")
    return groups[path]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(unknown_message(unknown, args.parser))   # exit 2, with the usage
    args.argv = argv   # the command line as typed: a training command prints it back to resume an interrupted run
    _quiet_library_progress()
    try:
        return args.handler(args)
    except PreftuneError as exc:
        err.print("[bold red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


def unknown_message(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """'unknown option --x (did you mean --y?)' for the first unrecognised option, else the stray words."""
    options = [o for o in unknown if o.startswith("-")]
    if not options:
        return f"unrecognized arguments: {' '.join(unknown)}"
    word = options[0].split("=", 1)[0]
    hint = difflib.get_close_matches(word, [o for o in parser._option_string_actions if o.startswith("--")], n=1)
    return f"unknown option '{word}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")


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
