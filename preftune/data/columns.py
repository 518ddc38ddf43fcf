"""Which columns a file has, which of them preftune reads, and the implicit-prompt rule.

A preference row has ``prompt``, ``chosen`` and ``rejected`` (and optionally ``preference_prob`` and
``margin``; ``score_chosen`` / ``score_rejected``, as in TRL's ultrafeedback_binarized, become margins with
``--margin_from_scores``). Other columns are kept out of training, as TRL does, with a one-line note naming
them (``note_unused_columns``), and are reported by ``preftune data check``. Without a ``prompt`` column the
file is read as TRL's implicit-prompt format (the prompt is what ``chosen`` and ``rejected`` share); there an
extra column holding text (``question``, ``instruction``) is refused, since it may be the prompt the rows meant,
rather than silently training on made-up prompts; columns of numbers, booleans or nulls are only noted.
A prompt file's columns go to reward functions as keywords, except those named like the functions' own
arguments (``completions``...), which are noted and not passed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys

from preftune.data.load import Records
from preftune.errors import DataError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
OPTIONAL_COLUMNS = ("preference_prob", "margin")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
KTO_COLUMNS = ("prompt", "completion", "label")
SFT_COLUMNS = ("messages", "prompt", "completion", "text")
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")   # a reward function's own


def column_names(records: Records) -> list[str]:
    """Every column some row has, in the order they first appear."""
    names: dict[str, None] = {}
    for row in records.rows:
        names.update(dict.fromkeys(row))
    return list(names)


def unknown_columns(records: Records, known=PAIR_COLUMNS + OPTIONAL_COLUMNS) -> list[str]:
    """The columns preftune does not read."""
    return [name for name in column_names(records) if name not in known]


def note_unused_columns(records: Records, known: tuple[str, ...] | None, reserved: tuple[str, ...] = ()) -> str | None:
    """Print (to stderr) and return one line naming the columns training leaves out: those not in ``known``
    (every column counts as read when ``known`` is None) and those in ``reserved``; None when there are none."""
    unused = [name for name in column_names(records)
              if name in reserved or (known is not None and name not in known)]
    if not unused:
        return None
    names = ", ".join(f"'{name}'" for name in unused)
    why = " (named like a reward function's own arguments)" if set(unused) & set(reserved) else ""
    line = f"{records.name}: column{'s' if len(unused) > 1 else ''} {names} not used in training{why}"
    print(line, file=sys.stderr, flush=True)
    return line


def scores_as_margins(records: Records) -> Records:
    """The rows with ``margin = score_chosen - score_rejected`` where a row has both scores and no margin of its
    own; the score columns themselves are then read (not noted as unused). A score that is not a finite number is
    a DataError naming the row."""
    rows = []
    for row, number in zip(records.rows, records.row_numbers):
        row = dict(row)
        scores = [row.pop(name, None) for name in SCORE_COLUMNS]
        if row.get("margin") is None and None not in scores:
            for name, value in zip(SCORE_COLUMNS, scores):
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise DataError(records.name, f"{name} must be a finite number, found {value!r}", row=number,
                                    field=name)
            row["margin"] = float(scores[0]) - float(scores[1])
        rows.append(row)
    return dataclasses.replace(records, rows=rows)


def _holds_text(records: Records, name: str) -> bool:
    return any(isinstance(row.get(name), (str, list, dict)) for row in records.rows)


def check_implicit_prompt_columns(records: Records) -> None:
    """Without a prompt column, an extra column holding text may be the prompt: DataError. Others pass."""
    unexpected = [name for name in unknown_columns(records, PAIR_COLUMNS + OPTIONAL_COLUMNS + SCORE_COLUMNS)
                  if _holds_text(records, name)]
    if not unexpected:
        return
    names = ", ".join(f"'{name}'" for name in unexpected)
    raise DataError(records.name, f"unexpected column {names}: preference rows need 'prompt', 'chosen' and "
                                  "'rejected' (a file with only 'chosen' and 'rejected' is read as the implicit-prompt "
                                  f"format, the prompt being their shared beginning); rename {names} to 'prompt', "
                                  "or remove it", field=unexpected[0])
