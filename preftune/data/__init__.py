"""Reading, validating, tokenising and batching preference data."""

from preftune.data.check import DatasetReport, check_dataset, render_report, report_to_dict
from preftune.data.collate import collate_completions, collate_pairs, collate_pairs_fn
from preftune.data.load import Records, load_records
from preftune.data.preference import TokenizedPair, TokenizeSettings, detect_format, tokenize_preferences
from preftune.data.rows import SkipReport

__all__ = [
    "DatasetReport", "Records", "SkipReport", "TokenizeSettings", "TokenizedPair",
    "check_dataset", "collate_completions", "collate_pairs", "collate_pairs_fn", "detect_format", "load_records",
    "render_report", "report_to_dict", "tokenize_preferences",
]
