"""Which columns a preference file has, which of them preftune reads, and the implicit-prompt rule.

A preference row has ``prompt``, ``chosen`` and ``rejected`` (and optionally ``preference_prob`` and
``margin``). Other columns are ignored in training and reported by ``preftune data check``. Without a
``prompt`` column the file is read as TRL's implicit-prompt format (the prompt is what ``chosen`` and
``rejected`` share) only when it has no other column at all: a file with ``question``, ``chosen`` and
``rejected`` names ``question`` as unexpected instead of silently training on made-up prompts.
"""

from __future__ import annotations

from preftune.data.load import Records
from preftune.errors import DataError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
OPTIONAL_COLUMNS = ("preference_prob", "margin")


def column_names(records: Records) -> list[str]:
    """Every column some row has, in the order they first appear."""
    names: dict[str, None] = {}
    for row in records.rows:
        names.update(dict.fromkeys(row))
    return list(names)


def unknown_columns(records: Records, known=PAIR_COLUMNS + OPTIONAL_COLUMNS) -> list[str]:
    """The columns preftune does not read."""
    return [name for name in column_names(records) if name not in known]


def check_implicit_prompt_columns(records: Records) -> None:
    """Without a prompt column, only chosen/rejected (and the optional columns) may be present, else DataError."""
    unexpected = unknown_columns(records)
    if not unexpected:
        return
    names = ", ".join(f"'{name}'" for name in unexpected)
    raise DataError(records.name, f"unexpected column {names}: preference rows need 'prompt', 'chosen' and "
                                  "'rejected' (a file with only 'chosen' and 'rejected' is read as the implicit-prompt "
                                  f"format, the prompt being their shared beginning); rename {names} to 'prompt', "
                                  "or remove it", field=unexpected[0])
