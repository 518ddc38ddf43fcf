"""The dataset report behind ``preftune data check FILE``: problems, columns, lengths, duplicates, biases.

Every row is validated (invalid rows are counted, not fatal); without a tokenizer the check stops at
structure and validity (fields, types, message roles, columns, duplicates), with one it also renders
conversations and measures token lengths: the untruncated lengths of every row whose content is valid,
including rows too long to keep.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from preftune.data.check_kinds import check_kind, detect_kind, stand_in_tokenizer, unread_columns
from preftune.data.columns import unknown_columns
from preftune.data.load import Records, load_records
from preftune.data.preference import (
    TokenizedPair,
    TokenizeSettings,
    check_settings,
    detect_format,
    fit_pairs,
    tokenize_untruncated,
    validate_rows,
)
from preftune.data.rows import summarise_problems

LENGTH_BIAS_THRESHOLD = 0.65    # warn when one side is the longer one in more than this share of pairs
DUPLICATE_THRESHOLD = 0.01      # warn when more than this share of rows repeat an earlier row
TRUNCATION_THRESHOLD = 0.10     # warn when more than this share of rows would be truncated


@dataclass
class LengthStats:
    """Token-length distribution of one part of the pairs."""

    min: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: int


@dataclass
class ValueStats:
    """Summary of an optional numeric column (``preference_prob`` or ``margin``)."""

    count: int
    min: float
    mean: float
    max: float


@dataclass
class DatasetReport:
    """Everything ``preftune data check`` reports about a preference dataset.

    ``lengths`` has keys prompt, chosen, rejected and total (prompt + the longer response), EOS
    included. ``duplicate_rows`` / ``duplicate_prompts`` count rows repeating an earlier row / prompt.
    """

    source: str
    format: str
    rows: int
    kept: int
    skipped: dict[str, int]
    examples: list[str]
    max_length: int
    max_prompt_length: int | None
    truncation_mode: str
    tokenized: bool = True       # False: checked without a tokenizer (no rendering, no token statistics)
    unknown_columns: list[str] = field(default_factory=list)
    lengths: dict[str, LengthStats] = field(default_factory=dict)
    over_max_length: int = 0
    over_max_prompt_length: int = 0
    truncated: int = 0
    duplicate_rows: int = 0
    duplicate_prompts: int = 0
    chosen_longer_fraction: float | None = None
    rejected_longer_fraction: float | None = None
    mean_length_difference: float | None = None
    preference_prob: ValueStats | None = None
    margin: ValueStats | None = None
    warnings: list[str] = field(default_factory=list)


def check_dataset(source: str, tokenizer=None, settings: TokenizeSettings | None = None,
                  split: str = "train", kind: str | None = None) -> DatasetReport:
    """Load and validate a dataset of ``kind`` (preference, kto, sft, prompt; None: detected); with a tokenizer,
    also measure preference pairs in tokens. File-level problems raise DataError."""
    settings = settings or TokenizeSettings()
    check_settings(settings)
    records = load_records(source, split)
    kind = kind or detect_kind(records)
    if kind != "preference":
        return _check_other_kind(kind, records, tokenizer, settings)
    if tokenizer is None:
        kept, problems = validate_rows(records)
        analysed, keys = kept, [_text_key(t) for t in kept]
    else:
        analysed, problems = tokenize_untruncated(records, tokenizer)
        kept, too_long = fit_pairs(analysed, settings, records.name)
        problems, keys = problems + too_long, [_ids_key(p) for p in analysed]
    skips = summarise_problems(len(records.rows), len(kept), problems)
    report = DatasetReport(source=records.name, format=detect_format(records), rows=skips.total, kept=skips.kept,
                           skipped=skips.skipped, examples=skips.examples, max_length=settings.max_length,
                           max_prompt_length=settings.max_prompt_length, truncation_mode=settings.truncation_mode,
                           tokenized=tokenizer is not None, unknown_columns=unknown_columns(records))
    if tokenizer is not None:
        _add_length_stats(report, analysed, kept, settings)
        _add_length_bias(report, analysed)
    _add_duplicates(report, keys)
    _add_value_stats(report, records, analysed)
    report.warnings = _warnings(report, len(analysed))
    return report


def _check_other_kind(kind: str, records, tokenizer, settings: TokenizeSettings) -> DatasetReport:
    fmt, skips, known = check_kind(kind, records, tokenizer or stand_in_tokenizer(records), settings)
    report = DatasetReport(source=records.name, format=fmt, rows=skips.total, kept=skips.kept, skipped=skips.skipped,
                           examples=skips.examples, max_length=settings.max_length,
                           max_prompt_length=settings.max_prompt_length, truncation_mode=settings.truncation_mode,
                           tokenized=False, unknown_columns=unread_columns(records, known))
    report.warnings = _warnings(report, skips.kept)
    return report


def _ids_key(pair: TokenizedPair) -> tuple:
    """(prompt key, row key) for duplicate counting."""
    prompt = tuple(pair.prompt_ids)
    return prompt, (prompt, tuple(pair.chosen_ids), tuple(pair.rejected_ids))


def _text_key(texts) -> tuple:
    prompt = json.dumps(texts.prompt)
    return prompt, (prompt, json.dumps(texts.chosen), json.dumps(texts.rejected))


def _percentile(ordered: list[int], q: float) -> float:
    """Linear-interpolation percentile of an ascending list (numpy's default method)."""
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def length_stats(lengths: list[int]) -> LengthStats:
    """min, mean, p50, p90, p99 and max of a non-empty list of lengths."""
    ordered = sorted(lengths)
    return LengthStats(min=ordered[0], mean=sum(ordered) / len(ordered), p50=_percentile(ordered, 0.5),
                       p90=_percentile(ordered, 0.9), p99=_percentile(ordered, 0.99), max=ordered[-1])


def _total_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def _add_length_stats(report: DatasetReport, pairs: list[TokenizedPair], fitted: list[TokenizedPair],
                      settings: TokenizeSettings) -> None:
    if not pairs:
        return
    report.lengths = {
        "prompt": length_stats([len(p.prompt_ids) for p in pairs]),
        "chosen": length_stats([len(p.chosen_ids) for p in pairs]),
        "rejected": length_stats([len(p.rejected_ids) for p in pairs]),
        "total": length_stats([_total_length(p) for p in pairs]),
    }
    report.over_max_length = sum(_total_length(p) > settings.max_length for p in pairs)
    if settings.max_prompt_length is not None:
        report.over_max_prompt_length = sum(len(p.prompt_ids) > settings.max_prompt_length for p in pairs)
    original = {p.row: p for p in pairs}
    report.truncated = sum(f != original[f.row] for f in fitted)


def _add_duplicates(report: DatasetReport, keys: list[tuple]) -> None:
    seen_rows, seen_prompts = set(), set()
    for prompt, row in keys:
        report.duplicate_rows += row in seen_rows
        report.duplicate_prompts += prompt in seen_prompts
        seen_rows.add(row)
        seen_prompts.add(prompt)


def _add_length_bias(report: DatasetReport, pairs: list[TokenizedPair]) -> None:
    if not pairs:
        return
    differences = [len(p.chosen_ids) - len(p.rejected_ids) for p in pairs]
    report.chosen_longer_fraction = sum(d > 0 for d in differences) / len(pairs)
    report.rejected_longer_fraction = sum(d < 0 for d in differences) / len(pairs)
    report.mean_length_difference = sum(differences) / len(pairs)


def _value_stats(values: list[float]) -> ValueStats:
    return ValueStats(count=len(values), min=min(values), mean=sum(values) / len(values), max=max(values))


def _add_value_stats(report: DatasetReport, records: Records, pairs: list) -> None:
    """``pairs``: tokenised pairs or validated rows (both carry ``preference_prob`` and ``margin``)."""
    if not pairs:
        return
    if any(row.get("preference_prob") is not None for row in records.rows):
        probs = [1.0 if math.isnan(p.preference_prob) else p.preference_prob for p in pairs]   # NaN: none given
        report.preference_prob = _value_stats(probs)
    if any(row.get("margin") is not None for row in records.rows):
        report.margin = _value_stats([p.margin for p in pairs])


def _warnings(report: DatasetReport, analysed: int) -> list[str]:
    warnings = []
    invalid = report.rows - report.kept
    if invalid:
        warnings.append(f"{invalid} of {report.rows} rows are invalid: training stops at the first one "
                        "unless invalid rows are skipped")
    if report.unknown_columns:
        names = ", ".join(f"'{name}'" for name in report.unknown_columns)
        warnings.append(f"columns preftune does not read (training ignores them): {names}")
    for side, other, fraction in (("chosen", "rejected", report.chosen_longer_fraction),
                                  ("rejected", "chosen", report.rejected_longer_fraction)):
        if fraction is not None and fraction > LENGTH_BIAS_THRESHOLD:
            warnings.append(f"{side} is longer than {other} in {fraction:.0%} of pairs: a length bias DPO will learn")
    if analysed and report.duplicate_rows / analysed > DUPLICATE_THRESHOLD:
        warnings.append(f"{report.duplicate_rows} rows ({report.duplicate_rows / analysed:.0%}) repeat an earlier "
                        "row exactly: duplicates weigh those pairs more than the rest")
    if analysed and report.truncated / analysed > TRUNCATION_THRESHOLD:
        warnings.append(f"{report.truncated} rows ({report.truncated / analysed:.0%}) would be truncated to fit "
                        f"max_length {report.max_length}: consider raising it")
    return warnings


def report_to_dict(report: DatasetReport) -> dict:
    """The report as plain JSON-serialisable data."""
    return dataclasses.asdict(report)


def render_report(report: DatasetReport, console=None) -> None:
    """Print the report as rich tables."""
    from rich.console import Console

    console = console or Console()
    console.print(_summary_table(report))
    if report.lengths:
        console.print(_lengths_table(report))
    if report.skipped:
        console.print(_problems_table(report))
        for example in report.examples:
            console.print(f"  [dim]{_escape(example)}[/dim]")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {_escape(warning)}")
    if not report.warnings:
        console.print("[green]no warnings[/green]")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _summary_table(report: DatasetReport):
    from rich.table import Table

    table = Table(title=f"Dataset {_escape(report.source)}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("format", report.format), ("rows", report.rows), ("valid rows kept", report.kept),
            ("duplicate rows", report.duplicate_rows), ("duplicate prompts", report.duplicate_prompts)]
    if report.unknown_columns:
        rows.append(("columns not read", ", ".join(report.unknown_columns)))
    rows += _token_rows(report) if report.tokenized else [("token statistics", "need --tokenizer")]
    if report.chosen_longer_fraction is not None:
        rows.append(("chosen longer than rejected", f"{report.chosen_longer_fraction:.1%}"))
        rows.append(("mean chosen − rejected tokens", f"{report.mean_length_difference:+.1f}"))
    for name, stats in (("preference_prob", report.preference_prob), ("margin", report.margin)):
        if stats is not None:
            rows.append((name, f"min {stats.min:.3g}  mean {stats.mean:.3g}  max {stats.max:.3g}"))
    for name, value in rows:
        table.add_row(name, _escape(str(value)))
    return table


def _token_rows(report: DatasetReport) -> list[tuple[str, object]]:
    limits = f"{report.max_length} ({report.truncation_mode})"
    if report.max_prompt_length is not None:
        limits += f", prompt {report.max_prompt_length}"
    rows = [("length limits", limits), ("over max_length", report.over_max_length),
            ("would be truncated", report.truncated)]
    if report.max_prompt_length is not None:
        rows.append(("over max_prompt_length", report.over_max_prompt_length))
    return rows


def _lengths_table(report: DatasetReport):
    from rich.table import Table

    table = Table(title="Token lengths before truncation (EOS included)")
    table.add_column("part")
    for name in ("min", "mean", "p50", "p90", "p99", "max"):
        table.add_column(name, justify="right")
    for part, stats in report.lengths.items():
        table.add_row(part, str(stats.min), f"{stats.mean:.1f}", f"{stats.p50:.0f}", f"{stats.p90:.0f}",
                      f"{stats.p99:.0f}", str(stats.max))
    return table


def _problems_table(report: DatasetReport):
    from rich.table import Table

    table = Table(title="Invalid rows")
    table.add_column("problem")
    table.add_column("rows", justify="right")
    for kind, count in sorted(report.skipped.items(), key=lambda item: -item[1]):
        table.add_row(kind, str(count))
    return table
