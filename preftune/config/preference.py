"""Configs of the commands that learn from preferences: ``preftune dpo``, ``preftune kto`` and ``preftune reward``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_ranges, option, with_default
from .grpo import GRPOConfig
from .losses import (
    F_DIVERGENCES,
    LOSS_HYPERPARAMETERS,
    UNWEIGHTABLE,
    beta_range,
    check_loss_settings,
    loss_help,
    needs_reference,
    parse_loss_types,
)
from .shared import (
    DataSettings,
    ModelSettings,
    PairLayout,
    PairScores,
    TrainSettings,
    check_reference_sync,
    validate_data,
)


@dataclass
class DPOConfig(ModelSettings, DataSettings, TrainSettings, PairLayout, PairScores):
    """``preftune dpo``: Direct Preference Optimization and its family."""

    loss_type: str = option("sigmoid", loss_help())
    loss_weights: list[float] = option([], "Weight of each loss of a loss_type list (MPO; default: 1 each).")
    beta: float = option(0.1, "Strength of the KL constraint (DPO's beta).")
    label_smoothing: float = option(0.0, "Global label noise epsilon (soft labels; rDPO's noise rate). "
                                    "A per-row preference_prob column takes precedence.")
    simpo_gamma: float = option(0.5, "SimPO target reward margin.")
    cpo_alpha: float = option(1.0, "Weight of CPO's NLL term on the chosen responses.")
    discopop_tau: float = option(0.05, "Temperature of DiscoPOP's blend of the logistic and exponential losses.")
    f_divergence_type: str = option("reverse_kl", "The divergence from the reference the loss regularises (f-DPO): "
                                                  "reverse_kl is plain DPO.", choices=list(F_DIVERGENCES))
    f_alpha_divergence_coef: float = option(0.5, "The alpha of f_divergence_type alpha_divergence (TRL's "
                                                 "parameterisation; 1 is reverse KL).")
    nll_weight: float = option(0.0, "Weight of an NLL term on the chosen response added to the loss.")
    ld_alpha: float | None = option(None, "LD-DPO (Liu et al. 2024): each completion's log-prob (policy and "
                                          "reference) counts its tokens beyond the pair's shared length min(|y_c|, "
                                          "|y_r|) times this alpha, in [0, 1]; unset or 1: plain sums.")
    use_weighting: bool = option(False, "WPO (Zhou et al. 2024): multiply each pair's loss by exp(mean of log p - "
                                        "log Σ_v p_v² over the chosen tokens + the same over the rejected), from the "
                                        "policy, without gradient.")
    constraints: list[str] = option([], "Extra penalty terms 'module:function[=weight]', each called with the batch's "
                                        "log-probs.")
    precompute_ref: bool = option(False, "Compute reference log-probs once before training and cache them on disk.")
    sync_ref_model: bool = with_default(GRPOConfig, "sync_ref_model", False)
    ref_model_sync_steps: int = with_default(GRPOConfig, "ref_model_sync_steps", 512)
    ref_model_mixup_alpha: float = with_default(GRPOConfig, "ref_model_mixup_alpha", 0.6)
    cache_dir: str | None = option(None, "Where precomputed reference log-probs are cached (default "
                                         "~/.cache/preftune).")

    def validate(self, require_model: bool = True) -> None:
        validate_data(self, require_model)
        self.validate_loss()
        if not (0.0 <= self.label_smoothing < 0.5):
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a positive number, got {self.beta}")
        for spec in self.constraints:
            parse_constraint_spec(spec)
        self.validate_sync()

    def validate_sync(self) -> None:
        """TR-DPO (``sync_ref_model``): a separate frozen reference that ``preftune dpo`` runs live."""
        if not self.sync_ref_model:
            return
        if type(self) is not DPOConfig:
            raise ConfigError("sync_ref_model (TR-DPO) is offered by preftune dpo (and grpo/rloo), not this command")
        if self.precompute_ref:
            raise ConfigError("sync_ref_model moves the reference during training, so its log-probs cannot be "
                              "precomputed; turn precompute_ref off")
        if not needs_reference(self.loss_type):
            raise ConfigError(f"sync_ref_model: loss_type {self.loss_type} uses no reference model")
        check_reference_sync(self)

    def validate_loss(self) -> None:
        """The loss names against the loss table; loss options none of them takes refused."""
        parse_loss_types(self.loss_type)
        check_loss_settings(self, {f.name: f.default for f in dataclasses.fields(DPOConfig)})
        check_ranges(self, positive_numbers=["discopop_tau"], non_negative=["cpo_alpha"])
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"ld_alpha must be in [0, 1] (LD-DPO's weight of the tokens beyond a pair's shared "
                              f"length), got {self.ld_alpha}")
        unweightable = sorted(set(parse_loss_types(self.loss_type)) & set(UNWEIGHTABLE))
        if self.use_weighting and unweightable:
            raise ConfigError(f"use_weighting (WPO) cannot weight loss_type {', '.join(unweightable)}: it sorts values "
                              f"over the batch, so its loss values belong to no pair")
        if any(not (math.isfinite(w) and w >= 0) for w in self.loss_weights):
            raise ConfigError(f"loss_weights must be non-negative numbers, got {self.loss_weights}")
        if not math.isfinite(self.f_alpha_divergence_coef):
            raise ConfigError(f"f_alpha_divergence_coef must be a finite number, got {self.f_alpha_divergence_coef}")

    def usual_beta(self) -> tuple[float, float]:
        return beta_range(self.loss_type)

    def sanity_warnings(self) -> list[str]:
        """Hyper-parameters far outside the ranges practitioners report."""
        notes = []
        low, high = self.usual_beta()
        if not low <= self.beta <= high:
            notes.append(f"beta={self.beta} is far outside the usual range ({low}-{high}; 0.1-0.5 is typical for DPO).")
        usual, limits = (("1e-5 to 5e-4 for LoRA", (1e-6, 2e-3)) if getattr(self, "lora", False)
                         else ("1e-6 to 1e-5", (1e-7, 1e-4)))
        if not limits[0] <= self.learning_rate <= limits[1]:
            notes.append(f"learning_rate={self.learning_rate:g} is far outside the usual {usual} for preference "
                         f"tuning.")
        pairs = self.per_device_batch_size * self.gradient_accumulation_steps
        if not 4 <= pairs <= 1024:
            notes.append(f"{pairs} pairs per optimiser step (per device) is far outside the usual 32-128.")
        return notes


def parse_constraint_spec(spec: str) -> tuple[str, float]:
    """'pkg.mod:fn=0.5' -> ('pkg.mod:fn', 0.5)."""
    target, has_weight, weight = spec.partition("=")
    if ":" not in target or not target.split(":", 1)[0] or not target.split(":", 1)[1]:
        raise ConfigError(f"constraint '{spec}' must look like 'module:function' or 'module:function=weight'")
    if not has_weight:
        return target, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"constraint '{spec}': weight '{weight}' is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"constraint '{spec}': weight must be a finite number")
    return target, value


@dataclass
class KTOConfig(DPOConfig):
    """``preftune kto``: KTO on desirable / undesirable examples (unpaired rows, or pairs split in two).

    Every DPO option that is not about the pairwise loss applies unchanged (model, data, training loop,
    LoRA, the reference and its cache).
    """

    loss_type: str = option("kto", "KTO (Ethayarajh et al. 2024); the only loss of this command.", choices=["kto"])
    beta: float = option(0.1, "β of the implied reward β·(log π - log π_ref).")
    desirable_weight: float = option(1.0, "λ_D, the weight of desirable examples. The paper advises "
                                          "λ_D·n_D / (λ_U·n_U) in [1, 4/3].")
    undesirable_weight: float = option(1.0, "λ_U, the weight of undesirable examples.")
    kto_kl: bool = option(True, "Use the reference point z₀ (a KL estimate from each prompt paired with another "
                                "example's completion); --no-kto_kl sets z₀ = 0.")

    def validate_loss(self) -> None:
        """KTO has one loss; the pair-loss options are refused below."""

    def usual_beta(self) -> tuple[float, float]:
        return 0.01, 1.0

    def validate(self, require_model: bool = True) -> None:
        super().validate(require_model)
        check_ranges(self, positive_numbers=["desirable_weight", "undesirable_weight"])
        defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
        unused = {"label_smoothing": 0.0, "nll_weight": 0.0, "constraints": [], "loss_weights": [],
                  "f_divergence_type": "reverse_kl", "margin_from_scores": False, "ld_alpha": None,
                  "use_weighting": False,
                  **{name: defaults[name] for name in LOSS_HYPERPARAMETERS}}    # simpo_gamma, cpo_alpha, ...
        for name, default in unused.items():
            if getattr(self, name) != default:
                raise ConfigError(f"{name} is an option of the pairwise DPO losses; KTO does not use it")

    def sanity_warnings(self) -> list[str]:
        return [note.replace(" pairs per optimiser step", " examples per optimiser step")
                for note in super().sanity_warnings()]



@dataclass
class RewardConfig(ModelSettings, DataSettings, TrainSettings, PairLayout, PairScores):
    """``preftune reward``: a scalar reward model trained on preference pairs."""

    learning_rate: float = with_default(TrainSettings, "learning_rate", 1e-5)
    loss_type: str = option("bradley_terry", "Reward loss: bradley_terry (-log σ(r_c - r_r - m)), ranking "
                                             "(relu(margin - (r_c - r_r))), "
                            "soft_label (Bradley-Terry against the per-row preference_prob).",
                            choices=["bradley_terry", "ranking", "soft_label"])
    margin: float = option(1.0, "Required gap r_c - r_r of the ranking loss (a per-row margin column is added to it).")
    centering_coef: float = option(0.0, "Weight of the centring penalty (r_c + r_r)² that keeps rewards near 0.")

    def validate(self, require_model: bool = True) -> None:
        validate_data(self, require_model)
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise ConfigError(f"margin must be a non-negative number, got {self.margin}")
        if not (self.centering_coef >= 0 and math.isfinite(self.centering_coef)):
            raise ConfigError(f"centering_coef must be a non-negative number, got {self.centering_coef}")
        if self.ref_model_name_or_path:
            raise ConfigError("ref_model_name_or_path: a reward model has no reference model; remove this option")

    def sanity_warnings(self) -> list[str]:
        """Hyper-parameters far outside the ranges practitioners use for reward models."""
        notes = []
        if not 1e-7 <= self.learning_rate <= 1e-3:
            notes.append(f"learning_rate={self.learning_rate:g} is far outside the usual 1e-6 to 1e-4 for reward "
                         f"models.")
        return notes
