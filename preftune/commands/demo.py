"""``preftune demo``: the built-in controlled-sentiment experiment (:mod:`preftune.demo`)."""

from __future__ import annotations


def demo_arguments(parser) -> None:
    parser.add_argument("--output_dir", default="runs/demo", help="Where the demo writes its runs, report.html and "
                                                                  "summary.json.")
    parser.add_argument("--quick", action="store_true", help="A smaller, faster version (for smoke tests).")


def run_demo(args) -> int:
    from ..demo import run_demo as demo

    demo(args.output_dir, quick=args.quick)
    return 0
