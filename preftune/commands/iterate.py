"""``preftune iterate``: iterative DPO (or KTO) with rejection sampling, judged by a scorer or by people."""

from __future__ import annotations

from ..config import add_config_arguments, config_from_args
from ..config.iterate import IterateConfig
from .training import CONFIG_NOTE

HELP = "Iterative DPO with rejection sampling: rounds of sample, judge (scorer or people), select, train, evaluate."
DESCRIPTION = ("Each round samples samples_per_prompt completions per prompt from the current policy, scores them "
               "with --judge (reward_model:, function: or llm:) or by people (--annotate_db, --project), keeps the "
               "best vs the worst (or all pairs), trains the DPO-family loss_type (or kto) from the previous round's "
               "policy, and evaluates held-out prompts. Rounds are kept in output_dir/rounds/; --resume continues a "
               "stopped run." + CONFIG_NOTE)


def iterate_arguments(parser) -> None:
    add_config_arguments(parser, IterateConfig)


def run_iterate(args) -> int:
    from rich.console import Console

    cfg = config_from_args(IterateConfig, args)  # report config mistakes before the heavy imports
    from ..iterate.rounds import train_iterate

    result = train_iterate(cfg)
    out = Console()
    out.print(f"[green]done[/]: {len(result.rounds) - 1} rounds; final model in {result.model_dir}")
    out.print(f"report: {result.report}   per-round metrics: {result.run_dir / 'rounds.jsonl'}")
    return 0
