"""The ``preftune`` commands: :mod:`.table` lists every one; the modules beside it hold their arguments and handlers.

A handler takes the parsed arguments and returns an exit code; it imports the heavy libraries
(torch, transformers, the annotation server) itself, so that ``preftune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One row of the command table."""

    name: str  # the words after ``preftune``, e.g. "dpo" or "annotate token add"
    run: Callable[[argparse.Namespace], int]  # the handler: parsed arguments -> exit code
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments to its parser
    help: str  # one line, shown in the parent command's --help
    description: str | None = None  # shown by the command's own --help (default: help)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults (but not None or False); leaves out old spellings of options, which still work."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        old = getattr(action, "old_spellings", ())
        if old:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in old]
        return super()._format_action_invocation(action)


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> argparse.Action:
    """``--name`` (snake_case, like every option); the older ``--kebab-case`` spelling is accepted, unlisted."""
    old = name.replace("_", "-")
    action = parser.add_argument(f"--{name}", *([f"--{old}"] if old != name else []), dest=name, **kwargs)
    action.old_spellings = [f"--{old}"] if old != name else []
    return action
