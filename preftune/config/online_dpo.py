"""Config of ``preftune online-dpo``: DPO on pairs sampled from the current policy and judged on the fly.

Option names follow TRL's ``OnlineDPOConfig`` where it has them (``max_new_tokens``, ``beta``,
``loss_type``, ``missing_eos_penalty``, ``judge``); the preference-loss options are DPO's own fields,
the sampling options PPO's and GRPO's (each declared once, only the default changes here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_ranges, option, with_default
from .grpo import GRPOConfig
from .losses import beta_range, check_loss_settings, parse_loss_types
from .online import OnlineRLSettings
from .ppo import PPOConfig
from .preference import DPOConfig, parse_constraint_spec
from .shared import validate_training


@dataclass
class OnlineDPOConfig(OnlineRLSettings):
    """``preftune online-dpo``: online DPO (Guo et al. 2024) with any DPO-family loss."""

    output_dir: str = with_default(OnlineRLSettings, "output_dir", "runs/online-dpo")
    judge: str | None = option(None, "Who picks the preferred of the two completions: reward_model:PATH, "
                                     "function:module:function (fn(prompts, completions) -> scores) or llm:BASE_URL "
                                     "(a pairwise LLM judge) (required).")
    loss_type: str = with_default(DPOConfig, "loss_type", "sigmoid")
    beta: float = with_default(DPOConfig, "beta", 0.1)
    label_smoothing: float = with_default(DPOConfig, "label_smoothing", 0.0)
    loss_weights: list[float] = with_default(DPOConfig, "loss_weights", [])
    simpo_gamma: float = with_default(DPOConfig, "simpo_gamma", 0.5)
    cpo_alpha: float = with_default(DPOConfig, "cpo_alpha", 1.0)
    discopop_tau: float = with_default(DPOConfig, "discopop_tau", 0.05)
    f_divergence_type: str = with_default(DPOConfig, "f_divergence_type", "reverse_kl")
    f_alpha_divergence_coef: float = with_default(DPOConfig, "f_alpha_divergence_coef", 0.5)
    nll_weight: float = with_default(DPOConfig, "nll_weight", 0.0)
    constraints: list[str] = with_default(DPOConfig, "constraints", [])
    max_new_tokens: int = with_default(PPOConfig, "max_new_tokens", 64)
    sampling_batch_size: int = with_default(GRPOConfig, "sampling_batch_size", 32)
    max_steps: int = option(-1, "Stop after this many steps (one batch of prompts, two completions each, one "
                                "optimiser update; overrides num_epochs when > 0).")
    learning_rate: float = with_default(DPOConfig, "learning_rate", 5e-7)

    def validate(self, require_model: bool = True, require_judge: bool = True) -> None:
        self.check_prompts(require_model, "the policy to start from")
        if require_judge and not self.judge:
            raise ConfigError("judge is required: reward_model:PATH, function:module:function or llm:BASE_URL")
        validate_training(self)
        parse_loss_types(self.loss_type)
        check_loss_settings(self, {f.name: f.default for f in dataclasses.fields(OnlineDPOConfig)})
        check_ranges(self, positive=["max_prompt_length", "max_new_tokens", "sampling_batch_size"],
                     positive_numbers=["temperature", "beta"])
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for spec in self.constraints:
            parse_constraint_spec(spec)
        self.check_sampling()

    def sanity_warnings(self) -> list[str]:
        notes = []
        low, high = beta_range(self.loss_type)
        if not low <= self.beta <= high:
            notes.append(f"beta={self.beta} is far outside the usual range ({low}-{high}; 0.1 is typical for DPO).")
        return notes
