"""Config of ``preftune ppo``."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_ranges, option, with_default
from .online import OnlineRLSettings
from .shared import TrainSettings


@dataclass
class PPOConfig(OnlineRLSettings):
    """``preftune ppo``: RL fine-tuning of a policy against a reward model or function (PPO, KL-penalised)."""

    output_dir: str = with_default(OnlineRLSettings, "output_dir", "runs/ppo")
    reward_model_path: str | None = option(None, "Reward model directory (trained by `preftune reward`) scoring "
                                                 "prompt + response.")
    reward_function: str | None = option(None, "Instead of a reward model: 'module:function' or "
                                               "'path/file.py:function', called as fn(prompts, responses) -> one "
                                               "number per response.")
    normalize_scores: bool = option(False, "Standardise scores with a running mean and std over every score seen so "
                                           "far.")
    score_clip: float = option(0.0, "Clip (normalised) scores to [-score_clip, score_clip]; 0 disables.")
    max_new_tokens: int = option(64, "Longest response sampled per prompt.")
    sampling_batch_size: int = option(16, "Sequences per generation, scoring and no-grad forward pass during "
                                            "rollouts.")
    num_mini_batches: int = option(1, "Minibatches (optimiser steps) per pass over a rollout batch. A rollout batch is "
                                      "per_device_batch_size x processes x gradient_accumulation_steps x "
                                      "num_mini_batches prompts.")
    num_ppo_epochs: int = option(4, "Passes over each rollout batch.")
    max_steps: int = option(-1, "Stop after this many PPO iterations (one rollout batch and its updates each; "
                                "overrides num_epochs when > 0).")
    learning_rate: float = with_default(TrainSettings, "learning_rate", 3e-6)
    warmup_ratio: float = with_default(TrainSettings, "warmup_ratio", 0.0)
    cliprange: float = option(0.2, "PPO clip range ε of the probability ratio.")
    cliprange_value: float = option(0.2, "Clip range of the value function update.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    gamma: float = option(1.0, "Discount factor γ.")
    lam: float = option(0.95, "GAE λ.")
    kl_estimator: str = option("k1", "Per-token KL estimator: k1 (log π - log π_ref) or k3 ((ρ-1) - log ρ, ρ = "
                                     "π_ref/π).",
                               choices=["k1", "k3"])
    kl_coef: float = option(0.05, "Coefficient β of the per-token KL penalty (initial value when adaptive_kl).")
    adaptive_kl: bool = option(False, "Adapt β to keep the KL near target_kl (Ziegler et al. 2019 proportional "
                                      "controller).")
    target_kl: float = option(6.0, "KL (nats per response) the adaptive controller aims for.")
    kl_horizon: int = option(10000, "Horizon of the adaptive controller, in samples.")
    value_model: str = option("auto", "Critic: shared (a value head on the policy's backbone; 1-model PPO) or "
                                      "separate (a copy of the policy's backbone with its own head). auto: shared with "
                                      "LoRA, else separate.",
                              choices=["auto", "shared", "separate"])

    def validate(self, require_model: bool = True, require_reward: bool = True) -> None:
        self.check_prompts(require_model, "the policy to start from, usually an SFT model")
        if self.reward_model_path and self.reward_function or require_reward and not (
                self.reward_model_path or self.reward_function):
            raise ConfigError("give exactly one reward source: reward_model_path (a reward model directory) or "
                              "reward_function ('module:function')")
        if self.reward_function and ":" not in self.reward_function:
            raise ConfigError(f"reward_function '{self.reward_function}' must look like 'module:function' or "
                              "'path/file.py:function'")
        self.check_training("PPO", "rollout")
        check_ranges(self, positive=["max_prompt_length", "max_new_tokens", "sampling_batch_size", "num_mini_batches",
                                      "num_ppo_epochs", "kl_horizon"],
                      positive_numbers=["temperature", "cliprange", "cliprange_value", "target_kl"],
                      non_negative=["vf_coef", "kl_coef", "score_clip"], unit_interval=["gamma", "lam"])
        self.check_sampling()

    def sanity_warnings(self) -> list[str]:
        notes = []
        if not 1e-7 <= self.learning_rate <= 1e-4:
            notes.append(f"learning_rate={self.learning_rate:g} is far outside the usual 1e-6 to 1e-5 for PPO.")
        if self.top_k or self.top_p < 1.0:
            notes.append("top_k / top_p: PPO treats samples as drawn from the full distribution at the given "
                         "temperature, so filtered samples are slightly off-policy.")
        return notes + self.lora_dropout_note("PPO")
