"""``preftune ppo``: RL fine-tuning of a policy against a reward model or a Python reward function."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..config import PPOConfig, add_config_arguments, config_from_args

out = Console()


def register(subparsers) -> None:
    ppo = subparsers.add_parser(
        "ppo", help="Fine-tune a policy with PPO against a reward model or a reward function (KL-penalised).",
        description="Proximal Policy Optimization for language models: sample responses to the prompts, score them "
                    "(reward_model_path or reward_function), penalise the KL to the starting policy, and update policy "
                    "and critic with clipped objectives. Every option can be set in the YAML file given by --config or "
                    "by its flag; flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(ppo, PPOConfig)
    ppo.set_defaults(handler=run_ppo)


def run_ppo(args) -> int:
    cfg = config_from_args(PPOConfig, args)  # report config mistakes before the heavy imports
    from ..train.ppo import train_ppo

    result = train_ppo(cfg)
    if result.is_main_process:
        out.print(f"[green]done[/]: model saved to {result.model_dir}")
        out.print(f"metrics written to {result.metrics_file}; example generations in {result.run_dir / 'samples.jsonl'}")
    return 0
