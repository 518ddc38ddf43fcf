"""``preftune data check``: validate a dataset and report columns, lengths, duplicates and biases.

The exit code gates a pipeline: 2 when any row is invalid (or, with ``--skip_invalid``, when no valid
row is left), else 0.
"""

from __future__ import annotations

import json


def check_arguments(parser) -> None:
    parser.add_argument("dataset", help="File, save_to_disk directory or hub name.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer (local directory, hub name or .gguf file) to "
                                                          "render conversations and count tokens; without one only "
                                                          "structure and validity are checked.")
    parser.add_argument("--kind", default="auto", choices=("auto", "preference", "kto", "sft", "prompt"),
                        help="Which trainer's data the file is: preference (dpo, reward), kto, sft, prompt (ppo, "
                             "grpo, rloo, online-dpo); auto: from the columns most rows have.")
    parser.add_argument("--split", default="train", help="Split to read from a directory or hub dataset.")
    parser.add_argument("--max_length", type=int, default=1024, help="Maximum prompt + completion tokens (with "
                                                                     "--tokenizer).")
    parser.add_argument("--max_prompt_length", type=int, default=None, help="Maximum prompt tokens (with "
                                                                            "--tokenizer).")
    parser.add_argument("--skip_invalid", action="store_true", help="Exit 0 despite invalid rows while at least one "
                                                                    "valid row remains (training would skip them).")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def run_check(args) -> int:
    from rich.console import Console

    from ..data import TokenizeSettings
    from ..data.check import check_dataset, render_report, report_to_dict
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    settings = TokenizeSettings(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    report = check_dataset(args.dataset, tokenizer, settings, split=args.split,
                           kind=None if args.kind == "auto" else args.kind)
    if args.json:
        print(json.dumps(report_to_dict(report), indent=2))
    else:
        render_report(report, Console())
    return exit_code(report, args.skip_invalid)


def exit_code(report, skip_invalid: bool) -> int:
    """2 when a row is invalid (unless skipped) or none is valid, and say so on stderr; else 0."""
    from rich.console import Console
    from rich.markup import escape

    invalid = report.rows - report.kept
    if report.kept and not (invalid and not skip_invalid):
        return 0
    reason = "no row is valid" if not report.kept else (f"{invalid} of {report.rows} rows are invalid (pass "
                                                         "--skip_invalid to accept them as skipped)")
    message = f"[bold red]error:[/] {escape(report.source)}: {reason}"
    Console(stderr=True).print(message, highlight=False, soft_wrap=True)
    return 2
