"""Config of ``preftune ppo``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_ranges, option, with_default
from .shared import DataSource, ModelSettings, TrainSettings, validate_training


@dataclass
class PPOConfig(ModelSettings, DataSource, TrainSettings):
    """``preftune ppo``: RL fine-tuning of a policy against a reward model or function (PPO, KL-penalised)."""

    output_dir: str = option("runs/ppo", "Run directory: metrics.jsonl, samples.jsonl, checkpoints/ and the final "
                                         "model/.")
    dataset: str | None = option(None, "Prompts: JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub name with "
                                       "a 'prompt' column (strings or lists of messages) (required).")
    max_prompt_length: int = option(512, "Longer prompts keep their last this many tokens.")
    reward_model_path: str | None = option(None, "Reward model directory (trained by `preftune reward`) scoring "
                                                 "prompt + response.")
    reward_function: str | None = option(None, "Instead of a reward model: 'module:function' or "
                                               "'path/file.py:function', called as fn(prompts, responses) -> one "
                                               "number per response.")
    missing_eos_penalty: float = option(0.0, "Subtracted from the score of a response that never emits EOS within "
                                             "max_new_tokens.")
    normalize_scores: bool = option(False, "Standardise scores with a running mean and std over every score seen so "
                                           "far.")
    score_clip: float = option(0.0, "Clip (normalised) scores to [-score_clip, score_clip]; 0 disables.")
    max_new_tokens: int = option(64, "Longest response sampled per prompt.")
    temperature: float = option(1.0, "Sampling temperature; log-probs are computed at the same temperature.")
    top_k: int = option(0, "Sample from the top k tokens only (0: all). Makes samples slightly off-policy.")
    top_p: float = option(1.0, "Nucleus sampling threshold (1: off). Makes samples slightly off-policy.")
    generation_batch_size: int = option(16, "Sequences per generation, scoring and no-grad forward pass during "
                                            "rollouts.")
    num_mini_batches: int = option(1, "Minibatches (optimiser steps) per pass over a rollout batch. A rollout batch is "
                                      "per_device_batch_size x processes x gradient_accumulation_steps x "
                                      "num_mini_batches prompts.")
    num_ppo_epochs: int = option(4, "Passes over each rollout batch.")
    max_steps: int = option(-1, "Stop after this many PPO iterations (one rollout batch and its updates each; "
                                "overrides num_epochs when > 0).")
    learning_rate: float = with_default(TrainSettings, "learning_rate", 3e-6)
    warmup_ratio: float = with_default(TrainSettings, "warmup_ratio", 0.0)
    logging_steps: int = option(1, "Write averaged metrics every this many iterations.")
    save_steps: int = option(0, "Checkpoint every this many iterations (0: no intermediate checkpoints).")
    cliprange: float = option(0.2, "PPO clip range ε of the probability ratio.")
    cliprange_value: float = option(0.2, "Clip range of the value function update.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    gamma: float = option(1.0, "Discount factor γ.")
    lam: float = option(0.95, "GAE λ.")
    kl_coef: float = option(0.05, "Coefficient β of the per-token KL penalty (initial value when adaptive_kl).")
    kl_estimator: str = option("k1", "Per-token KL estimator: k1 (log π - log π_ref) or k3 ((ρ-1) - log ρ, ρ = "
                                     "π_ref/π).",
                               choices=["k1", "k3"])
    adaptive_kl: bool = option(False, "Adapt β to keep the KL near target_kl (Ziegler et al. 2019 proportional "
                                      "controller).")
    target_kl: float = option(6.0, "KL (nats per response) the adaptive controller aims for.")
    kl_horizon: int = option(10000, "Horizon of the adaptive controller, in samples.")
    value_model: str = option("auto", "Critic: shared (a value head on the policy's backbone; 1-model PPO) or "
                                      "separate (a copy of the policy's backbone with its own head). auto: shared with "
                                      "LoRA, else separate.",
                              choices=["auto", "shared", "separate"])
    log_samples_steps: int = option(10, "Write example generations to samples.jsonl every this many iterations (0: "
                                        "never).")
    log_samples: int = option(4, "Example generations written each time.")

    def validate(self, require_model: bool = True, require_reward: bool = True) -> None:
        if require_model and not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required (the policy to start from, usually an SFT model)")
        if not self.dataset:
            raise ConfigError("dataset is required (a file or dataset of prompts with a 'prompt' column)")
        if self.reward_model_path and self.reward_function or require_reward and not (
                self.reward_model_path or self.reward_function):
            raise ConfigError("give exactly one reward source: reward_model_path (a reward model directory) or "
                              "reward_function ('module:function')")
        if self.reward_function and ":" not in self.reward_function:
            raise ConfigError(f"reward_function '{self.reward_function}' must look like 'module:function' or "
                              "'path/file.py:function'")
        if not self.disable_dropout:
            raise ConfigError("PPO needs dropout off (rollout and update log-probs must come from the same function); "
                              "remove --no-disable_dropout")
        validate_training(self)
        check_ranges(self, positive=["max_prompt_length", "max_new_tokens", "generation_batch_size", "num_mini_batches",
                                      "num_ppo_epochs", "kl_horizon"],
                      positive_numbers=["temperature", "cliprange", "cliprange_value", "target_kl"],
                      non_negative=["vf_coef", "kl_coef", "score_clip"], unit_interval=["gamma", "lam"])
        if not math.isfinite(self.missing_eos_penalty):
            raise ConfigError(f"missing_eos_penalty must be a finite number, got {self.missing_eos_penalty}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")
        if self.log_samples_steps < 0 or self.log_samples < 0:
            raise ConfigError("log_samples_steps and log_samples must be >= 0")

    def sanity_warnings(self) -> list[str]:
        notes = []
        if not 1e-7 <= self.learning_rate <= 1e-4:
            notes.append(f"learning_rate={self.learning_rate:g} is far outside the usual 1e-6 to 1e-5 for PPO.")
        if self.top_k or self.top_p < 1.0:
            notes.append("top_k / top_p: PPO treats samples as drawn from the full distribution at the given "
                         "temperature, so filtered samples are slightly off-policy.")
        if self.lora and self.lora_dropout > 0:
            notes.append("PPO turns LoRA dropout off as well (lora_dropout is ignored).")
        return notes
