"""``preftune ppo``: RL fine-tuning of a policy against a reward model or a Python reward function."""

from __future__ import annotations

from ..config import PPOConfig
from . import add_training_command


def register(subparsers) -> None:
    add_training_command(
        subparsers, "ppo", PPOConfig, "preftune.train.ppo:train_ppo",
        help="Fine-tune a policy with PPO against a reward model or a reward function (KL-penalised).",
        description="Proximal Policy Optimization for language models: sample responses to the prompts, score them "
                    "(reward_model_path or reward_function), penalise the KL to the starting policy, and update policy "
                    "and critic with clipped objectives.")
