"""``preftune data check``: validate a dataset and report lengths, duplicates and biases."""

from __future__ import annotations

import json


def check_arguments(parser) -> None:
    parser.add_argument("dataset", help="File, save_to_disk directory or hub name.")
    parser.add_argument("--tokenizer", required=True, help="Tokenizer (local directory or hub name) used to count "
                                                           "tokens.")
    parser.add_argument("--split", default="train", help="Split to read from a directory or hub dataset.")
    parser.add_argument("--max_length", type=int, default=1024, help="Maximum prompt + completion tokens.")
    parser.add_argument("--max_prompt_length", type=int, default=None, help="Maximum prompt tokens.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def run_check(args) -> int:
    from rich.console import Console

    from ..data import TokenizeSettings
    from ..data.check import check_dataset, render_report, report_to_dict
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    settings = TokenizeSettings(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    report = check_dataset(args.dataset, tokenizer, settings, split=args.split)
    if args.json:
        print(json.dumps(report_to_dict(report), indent=2))
    else:
        render_report(report, Console())
    return 0
