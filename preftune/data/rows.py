"""Row validation plumbing shared by every reader: the invalid-row error, and the skip report.

A reader validates a row field by field and raises :class:`InvalidRow` (kind, field, reason); the
caller adds the file and row number (:meth:`InvalidRow.problem`), then either stops at the first
problem or skips invalid rows and reports how many it skipped and why.
"""

from __future__ import annotations

import numbers
from collections import Counter
from dataclasses import dataclass

from preftune.errors import DataError

MAX_EXAMPLES = 5


@dataclass
class SkipReport:
    """How many rows were read and kept, and why the others were not."""

    total: int
    kept: int
    skipped: dict[str, int]
    examples: list[str]


@dataclass
class RowProblem:
    """One invalid row: the kind of problem (for counting) and the error to show."""

    kind: str
    error: DataError


class InvalidRow(Exception):
    """Raised inside row validation; turned into a :class:`RowProblem` with the file and row."""

    def __init__(self, kind: str, field: str, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.kind, self.field, self.reason, self.fatal = kind, field, reason, fatal

    def problem(self, source: str, row: int) -> RowProblem:
        return RowProblem(self.kind, DataError(source, self.reason, row=row, field=self.field))


def read_rows(records, read, skip_invalid: bool = True) -> tuple[list[tuple], list[RowProblem]]:
    """``(read(row), row number)`` for each valid row of ``records``, and the problems of the invalid ones.

    ``read`` raises :class:`InvalidRow` for a bad row; a fatal one, or any when not ``skip_invalid``, raises
    its :class:`DataError` (naming the file, row and field) at once.
    """
    results, problems = [], []
    for row, number in zip(records.rows, records.row_numbers):
        try:
            results.append((read(row), number))
        except InvalidRow as invalid:
            problem = invalid.problem(records.name, number)
            if invalid.fatal or not skip_invalid:
                raise problem.error from None
            problems.append(problem)
    return results, problems


def type_name(value) -> str:
    """How a JSON value's type reads in an error message ("a string", "a list", "null", ...)."""
    if value is None:
        return "null"
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    if type(value) in names:
        return names[type(value)]
    return "a number" if isinstance(value, numbers.Number) else type(value).__name__


def summarise_problems(total: int, kept: int, problems: list[RowProblem]) -> SkipReport:
    """A SkipReport: counts by kind and the first few messages, in row order."""
    ordered = sorted(problems, key=lambda p: p.error.row or 0)
    return SkipReport(total=total, kept=kept, skipped=dict(Counter(p.kind for p in ordered)),
                      examples=[str(p.error) for p in ordered[:MAX_EXAMPLES]])


def settle_problems(source: str, total: int, kept: list, problems: list[RowProblem], skip_invalid: bool) -> SkipReport:
    """Raise the first invalid row's error (unless ``skip_invalid``), or if no row is left; else the report."""
    problems = sorted(problems, key=lambda p: p.error.row or 0)
    if problems and not skip_invalid:
        raise problems[0].error
    report = summarise_problems(total, len(kept), problems)
    if not kept:
        counts = ", ".join(f"{kind}: {count}" for kind, count in report.skipped.items())
        raise DataError(source, f"no valid rows: all {report.total} rows are invalid ({counts}); "
                                f"the first: {report.examples[0]}")
    return report
