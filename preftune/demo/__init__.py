"""``preftune demo``: the built-in controlled-sentiment experiment, offline, end to end.

:mod:`preftune.demo.sentiment` is the task (a review corpus and a rule-based sentiment oracle);
:mod:`preftune.demo.pipeline` runs it: pretrain (cached) -> SFT -> oracle-labelled pairs -> reward
model -> DPO at several beta, PPO at several KL coefficients, best-of-N -> held-out evaluation ->
``report.html`` and ``summary.json`` in the output directory.
"""

from __future__ import annotations


def run_demo(output_dir: str = "runs/demo", quick: bool = False, precision: str = "fp32") -> dict:
    from dataclasses import replace

    from .pipeline import DemoScale, run_pipeline

    return run_pipeline(output_dir, replace(DemoScale.quick() if quick else DemoScale(), precision=precision))
