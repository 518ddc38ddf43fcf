"""User-facing errors.

A :class:`PreftuneError` is a mistake the user can fix (a bad file, a bad option). The CLI prints
its message and exits with code 2, never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PreftuneError(Exception):
    """A user error: printed without a traceback, exit code 2."""

    exit_code = 2


class DataError(PreftuneError):
    """A problem with one row (or the whole) of a data file.

    The message always names the file and, where known, the 1-based row number and the field.
    """

    def __init__(self, source: str, reason: str, row: int | None = None, field: str | None = None):
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason
        where = source
        if row is not None:
            where += f": row {row}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {reason}")


class ConfigError(PreftuneError):
    """An invalid configuration value or option."""
