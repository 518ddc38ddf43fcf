"""Configs of ``preftune grpo`` and ``preftune rloo`` (one trainer; RLOO is GRPO with ``advantage: rloo``).

Option names follow TRL's ``GRPOConfig`` (``num_generations``, ``max_completion_length``, ``beta``,
``epsilon``, ``epsilon_high``, ``num_iterations``, ``loss_type``, ``scale_rewards``,
``mask_truncated_completions``, ``reward_funcs``, ``reward_weights``, ``steps_per_generation``).
Batch sizes count completions, as in TRL: a rollout batch is ``per_device_batch_size x processes x
steps_per_generation`` completions (``num_generations`` per prompt), ``steps_per_generation`` counting forward
passes as TRL does (default: ``gradient_accumulation_steps``, one optimiser step per rollout).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_ranges, option, with_default
from .online import OnlineRLSettings
from .shared import check_reference_sync

# the names preftune.losses.grpo accepts (a test keeps them equal); settings import no torch
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("token_mean", "sequence_mean", "constant", "sequence_sum")
LOSS_TYPE_ALIASES = {"grpo": "sequence_mean", "dapo": "token_mean", "bnpo": "token_mean", "dr_grpo": "constant",
                     "luspo": "sequence_sum"}
OBJECTIVES = ("clip", "cispo", "sapo", "vespo")
# TRL's loss_type names that change the objective too: (objective, aggregation)
OBJECTIVE_LOSS_TYPES = {"cispo": ("cispo", "token_mean"), "sapo": ("sapo", "sequence_mean"),
                        "vespo": ("vespo", "token_mean")}


@dataclass
class GRPOConfig(OnlineRLSettings):
    """``preftune grpo``: critic-free online RL with a group baseline (GRPO, DAPO, Dr. GRPO; RLOO by ``advantage``)."""

    output_dir: str = with_default(OnlineRLSettings, "output_dir", "runs/grpo")
    reward_funcs: list[str] = option([], "Reward functions, each 'module:function' or 'path/file.py:function' "
                                         "called as fn(prompts, completions) -> one number per completion, or a "
                                         "reward model directory (trained by `preftune reward`) (at least one).")
    reward_weights: list[float] = option([], "Weight of each reward function in the total reward (default: 1 each).")
    normalize_rewards: bool = option(False, "Standardise each reward function within its group before the weighted "
                                            "sum, then take the advantage of scale_rewards (TRL's normalize_then_sum "
                                            "scales by the batch: multi_objective_aggregation).")
    multi_objective_aggregation: str = option(
        "sum_then_normalize", "With several reward functions, as TRL: sum_then_normalize (weighted sum, then the "
                              "advantage of scale_rewards) or normalize_then_sum (each function standardised in its "
                              "group, weighted sum, then standardised over the batch; scale_rewards unused); grpo.",
        choices=["sum_then_normalize", "normalize_then_sum"])
    advantage: str = option("grpo", "grpo: reward minus the group mean, scaled by scale_rewards; rloo: reward (minus "
                                    "beta x KL) minus the mean of the other completions of the prompt; reinforce_pp "
                                    "(REINFORCE++): per token, the reward minus beta x the KL still to come, whitened "
                                    "over the batch's tokens; reinforce_pp_baseline: the same of the reward minus its "
                                    "group's mean.",
                            choices=["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
    rloo_objective: str = option("grpo", "rloo's policy loss: grpo (the clipped per-token loss of loss_type) or trl "
                                         "(TRL 1.16's RLOO: one importance ratio per sequence, π(o)/π_old(o), clipped, "
                                         "averaged over sequences; loss_type and importance_sampling_level unused).",
                                 choices=["grpo", "trl"])
    num_generations: int = option(8, "Completions sampled per prompt (the group size G).")
    max_completion_length: int = option(256, "Longest completion sampled.")
    sampling_batch_size: int = option(32, "Sequences per generation and no-grad forward pass (and reward-model "
                                          "batch).")
    generation_batch_size: int | None = option(None, "Completions per rollout batch over all processes, as in TRL: "
                                                     "per_device_batch_size x processes x steps_per_generation (give "
                                                     "one of the two; default from steps_per_generation).")
    per_device_batch_size: int = option(8, "Completions per device per forward pass.")
    steps_per_generation: int | None = option(None, "Forward passes (of per_device_batch_size completions) per rollout "
                                                    "batch, as in TRL; a multiple of gradient_accumulation_steps, "
                                                    "each gradient_accumulation_steps of them one optimiser step "
                                                    "(default: gradient_accumulation_steps, one step per rollout).")
    num_iterations: int = option(1, "Passes (μ) over each rollout batch.")
    beta: float = option(0.0, "KL coefficient. grpo: weight of the k3 KL to the reference in the loss; rloo: weight of "
                              "the sequence KL subtracted from the reward. 0: no reference is loaded.")
    sync_ref_model: bool = option(False, "With beta > 0, move the frozen reference towards the policy every "
                                         "ref_model_sync_steps optimiser steps (TR-DPO style); not with a LoRA "
                                         "adapter-disabled reference.")
    ref_model_sync_steps: int = option(512, "Optimiser steps between reference syncs (sync_ref_model).")
    ref_model_mixup_alpha: float = option(0.6, "A sync sets the reference to alpha x policy + (1 - alpha) x "
                                               "reference (1: a copy of the policy).")
    epsilon: float = option(0.2, "Lower clip range ε_low of the importance ratio.")
    epsilon_high: float | None = option(None, "Upper clip range ε_high (DAPO clip-higher, e.g. 0.28); default: "
                                              "epsilon.")
    loss_type: str = option("dapo", "Loss aggregation: token_mean (alias dapo, bnpo), sequence_mean (alias grpo), "
                                    "constant (alias dr_grpo) or sequence_sum (alias luspo, with "
                                    "importance_sampling_level sequence: LUSPO); or TRL's objectives cispo (CISPO, "
                                    "token mean; epsilon_high is its ratio cap), sapo (SAPO, sequence mean) and "
                                    "vespo (VESPO, token mean).",
                            choices=[*AGGREGATIONS, *LOSS_TYPE_ALIASES, *OBJECTIVE_LOSS_TYPES])
    importance_sampling_level: str = option("token", "One importance ratio per token, or one per sequence (the "
                                                     "exp of its tokens' mean log-ratio: GSPO).",
                                            choices=["token", "sequence"])
    delta: float | None = option(None, "Two-sided clipping: cap the unclipped ratio at delta (> 1 + epsilon_high).")
    off_policy_mask_threshold: float | None = option(None, "Drop from the loss the completions with a negative "
                                                           "advantage whose mean log π_old - log π exceeds this "
                                                           "(DeepSeek-V3.2's off-policy mask).")
    top_entropy_quantile: float = option(1.0, "Train only the completion tokens in this top fraction of entropy "
                                              "(0.2: the 20% highest-entropy tokens); 1: all.")
    entropy_coef: float = option(0.0, "Subtract this x the mean entropy of the trained tokens from the loss (an "
                                      "exploration bonus).")
    sapo_temperature_pos: float = option(1.0, "SAPO's gate temperature for positive advantages.")
    sapo_temperature_neg: float = option(1.05, "SAPO's gate temperature for negative advantages.")
    vespo_k_pos: float = option(2.0, "VESPO's shape k for positive advantages.")
    vespo_lambda_pos: float = option(3.0, "VESPO's rate λ for positive advantages.")
    vespo_k_neg: float = option(3.0, "VESPO's shape k for negative advantages.")
    vespo_lambda_neg: float = option(2.0, "VESPO's rate λ for negative advantages.")
    scale_rewards: str = option("group", "Divide advantages by the group's reward std (group), the batch's (batch) or "
                                         "not at all (none, Dr. GRPO). Ignored by rloo.",
                                choices=list(SCALE_REWARDS))
    mask_truncated_completions: bool = option(False, "Leave completions that reach max_completion_length without EOS "
                                                     "out of the loss (DAPO overlong filtering; the same as "
                                                     "missing_eos: drop).")
    overlong_cache: int = option(0, "DAPO soft overlong punishment: a penalty from 0 to -1 over the last this many "
                                    "tokens before max_completion_length, added to the reward (0: off).")
    dynamic_sampling: bool = option(False, "Drop groups whose rewards are all equal and sample more prompts (DAPO "
                                           "dynamic sampling).")
    max_resample_attempts: int = option(3, "Extra sampling rounds dynamic sampling may take per step; groups still "
                                           "missing are then filled with all-equal ones.")
    max_steps: int = option(-1, "Stop after this many iterations (one rollout batch and its updates each; overrides "
                                "num_epochs when > 0).")
    learning_rate: float = option(1e-6, "Peak learning rate (AdamW).")
    warmup_ratio: float = option(0.0, "Fraction of optimiser steps spent warming up linearly from 0.")

    @property
    def reward_scaling(self) -> str:
        """The std advantages are divided by: ``scale_rewards``, or the batch's with normalize_then_sum (whose
        per-function standardised sum has group means 0, so centring by the group or the batch is the same)."""
        return "batch" if self.multi_objective_aggregation == "normalize_then_sum" else self.scale_rewards

    @property
    def normalized_sum(self) -> bool:
        """Whether each reward function is standardised within its group before the weighted sum."""
        return self.normalize_rewards or self.multi_objective_aggregation == "normalize_then_sum"

    def forward_passes(self, processes: int = 1) -> int:
        """TRL's ``steps_per_generation``: given, or ``generation_batch_size / (per_device_batch_size x processes)``,
        or by default ``gradient_accumulation_steps``; ConfigError unless it is a multiple of the latter."""
        steps = self.steps_per_generation or self.gradient_accumulation_steps
        if self.generation_batch_size is not None:
            per_pass = self.per_device_batch_size * processes
            if self.generation_batch_size % per_pass:
                raise ConfigError(f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                                  f"per_device_batch_size x processes ({per_pass})")
            steps = self.generation_batch_size // per_pass
        if steps < 1 or steps % self.gradient_accumulation_steps:
            raise ConfigError(f"steps_per_generation ({steps}; generation_batch_size / (per_device_batch_size x "
                              "processes) when that is given) counts forward passes, as in TRL: it must be a positive "
                              f"multiple of gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        return steps

    def updates_per_generation(self, processes: int = 1) -> int:
        """Optimiser steps per pass over a rollout batch: ``steps_per_generation / gradient_accumulation_steps``."""
        return self.forward_passes(processes) // self.gradient_accumulation_steps

    @property
    def aggregation(self) -> str:
        """``loss_type`` with TRL's names resolved (see :data:`preftune.losses.grpo.LOSS_TYPE_ALIASES`); TRL's RLOO
        objective averages over sequences."""
        if self.rloo_objective == "trl":
            return "sequence_mean"
        if self.loss_type in OBJECTIVE_LOSS_TYPES:
            return OBJECTIVE_LOSS_TYPES[self.loss_type][1]
        return LOSS_TYPE_ALIASES.get(self.loss_type, self.loss_type)

    @property
    def objective(self) -> str:
        """The policy objective of ``loss_type``: clip (GRPO's), or TRL's cispo, sapo, vespo."""
        return OBJECTIVE_LOSS_TYPES.get(self.loss_type, ("clip",))[0]

    def policy_options(self) -> dict:
        """The options of :func:`preftune.losses.grpo.grpo_loss` that choose and shape the objective."""
        level = "sequence_sum" if self.rloo_objective == "trl" else self.importance_sampling_level
        return dict(objective=self.objective, importance_sampling_level=level,
                    delta=self.delta, off_policy_threshold=self.off_policy_mask_threshold,
                    top_entropy_quantile=self.top_entropy_quantile, entropy_coef=self.entropy_coef,
                    sapo_temperatures=(self.sapo_temperature_pos, self.sapo_temperature_neg),
                    vespo_shape=(self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg))

    def validate(self, require_model: bool = True, require_reward: bool = True) -> None:
        self.check_prompts(require_model, "the policy to start from")
        if require_reward and not self.reward_funcs:
            raise ConfigError("reward_funcs is required: one or more 'module:function' names or reward model "
                              "directories")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward_funcs")
        self.check_training("GRPO", "sampling")
        check_ranges(self, positive=["max_prompt_length", "max_completion_length", "sampling_batch_size",
                                      "num_iterations"],
                      positive_numbers=["temperature", "epsilon"], non_negative=["beta", "overlong_cache",
                                                                                  "max_resample_attempts"])
        self._validate_groups()
        self._validate_sync()

    def _validate_groups(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2 (a group baseline needs 2 completions), got "
                              f"{self.num_generations}")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("give generation_batch_size or steps_per_generation, not both (as in TRL: each fixes the "
                              "other)")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ConfigError(f"generation_batch_size must be a positive integer, got {self.generation_batch_size}")
        rollout = self.per_device_batch_size * self.forward_passes() if self.generation_batch_size is None \
            else self.generation_batch_size
        if rollout % self.num_generations:
            raise ConfigError(f"per_device_batch_size x steps_per_generation (or generation_batch_size) = {rollout} "
                              f"completions must be a multiple of num_generations ({self.num_generations})")
        if self.rloo_objective == "trl" and (self.advantage != "rloo" or self.objective != "clip"
                                             or self.importance_sampling_level != "token"):
            raise ConfigError("rloo_objective trl is TRL's RLOO loss (a clipped ratio per sequence): it needs "
                              "advantage rloo, a clip loss_type and importance_sampling_level token; got "
                              f"{self.advantage}, {self.loss_type} and {self.importance_sampling_level}")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.advantage != "grpo":
            raise ConfigError("multi_objective_aggregation normalize_then_sum is GRPO's (TRL's RLOO has no such "
                              "option); use advantage grpo, or normalize_rewards with rloo")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ConfigError(f"epsilon_high must be a positive number, got {self.epsilon_high}")
        if self.objective == "cispo" and self.epsilon_high is None:
            raise ConfigError("loss_type cispo caps the ratio at epsilon_high: set it (e.g. 5.0)")
        if self.delta is not None and not self.delta > 1 + (self.epsilon_high or self.epsilon):
            raise ConfigError(f"delta must exceed 1 + epsilon_high, got {self.delta}")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        check_ranges(self, non_negative=["entropy_coef"], positive_numbers=[
            "sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"])
        if self.overlong_cache > self.max_completion_length:
            raise ConfigError(f"overlong_cache ({self.overlong_cache}) must not exceed max_completion_length "
                              f"({self.max_completion_length})")
        self.check_sampling()

    def _validate_sync(self) -> None:
        if not self.sync_ref_model:
            return
        if self.beta <= 0:
            raise ConfigError("sync_ref_model needs beta > 0 (with beta 0 there is no reference to sync)")
        check_reference_sync(self)

    def sanity_warnings(self) -> list[str]:
        notes = []
        if self.advantage != "grpo" and self.scale_rewards != "group":
            notes.append(f"scale_rewards is ignored with advantage={self.advantage} (rloo's baseline is not scaled; "
                         "REINFORCE++ whitens over the batch's tokens).")
        return notes + self.lora_dropout_note("GRPO")


@dataclass
class RLOOConfig(GRPOConfig):
    """``preftune rloo``: REINFORCE Leave-One-Out (Ahmadian et al. 2024), the KL to the reference in the reward."""

    output_dir: str = with_default(OnlineRLSettings, "output_dir", "runs/rloo")
    advantage: str = option("rloo", "grpo: reward minus the group mean, scaled by scale_rewards; rloo: reward (minus "
                                     "beta x KL) minus the mean of the other completions of the prompt.",
                            choices=["grpo", "rloo"])
    beta: float = option(0.05, "Weight of the sequence KL to the reference subtracted from each reward (0: no "
                               "reference is loaded).")
