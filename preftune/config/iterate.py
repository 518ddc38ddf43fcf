"""Config of ``preftune iterate``: iterative DPO (or KTO) with rejection sampling, judged by a scorer or by people."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .base import check_ranges, option, with_default
from .losses import PAIR_LOSS_NAMES, loss_help
from .online import ReplySettings
from .preference import DPOConfig, KTOConfig

PAIR_LOSSES = PAIR_LOSS_NAMES


@dataclass
class IterateConfig(DPOConfig, ReplySettings):
    """``preftune iterate``: rounds of sample -> judge -> select -> train -> evaluate.

    ``dataset`` holds the training prompts (a ``prompt`` column: text or chat messages), ``eval_dataset``
    (or ``eval_fraction`` of them) the held-out prompts. Every training option of ``preftune dpo`` (and,
    with ``loss_type: kto``, of ``preftune kto``) applies to each round's training; ``max_steps`` and
    ``num_epochs`` count per round.
    """

    default_missing_eos = "drop"   # an unfinished sample is never a chosen or rejected reply

    loss_type: str = option("sigmoid", loss_help("Loss of each round on chosen/rejected pairs") + " Or kto on the "
                                       "top (desirable) and bottom (undesirable) samples.")
    precompute_ref: bool = with_default(DPOConfig, "precompute_ref", True)
    desirable_weight: float = with_default(KTOConfig, "desirable_weight", 1.0)
    undesirable_weight: float = with_default(KTOConfig, "undesirable_weight", 1.0)
    kto_kl: bool = with_default(KTOConfig, "kto_kl", True)

    rounds: int = option(2, "Rounds of sample -> judge -> select -> train -> evaluate.")
    samples_per_prompt: int = option(4, "Completions sampled per training prompt each round (k).")
    max_new_tokens: int = option(64, "Longest completion sampled, in tokens.")
    temperature: float = option(1.0, "Sampling temperature (training samples and evaluation alike).")
    top_k: int = option(0, "Sample among the k most likely tokens only (0: all).")
    top_p: float = option(1.0, "Nucleus sampling: the smallest set of tokens reaching this probability.")
    sampling_batch_size: int = option(16, "Sequences per batch when sampling and scoring.")
    judge: str | None = option(None, "Who judges the samples: reward_model:PATH, function:module:function or "
                                     "llm:BASE_URL (pairwise). Not needed with --annotate_db.")
    judge_model: str = option("judge", "Model name sent to an llm: judge.")
    oracle: str | None = option(None, "A second scorer used only to evaluate (never in training), to see whether "
                                      "optimising the judge helps the true goal.")
    ref: str = option("previous", "Reference of each round: the previous round's policy, or the initial model.",
                      choices=["previous", "initial"])
    selection: str = option("best_worst", "Pairs from each prompt's samples: best vs worst, or every pair "
                                          "(all_pairs). KTO always takes the best as desirable, the worst as "
                                          "undesirable.", choices=["best_worst", "all_pairs"])
    min_score_gap: float = option(0.0, "Drop (and count) pairs whose scores differ by this much or less.")
    margin_scale: float = option(0.0, "Give each pair margin = margin_scale x score difference (0: no margin).")
    preference_prob_scale: float = option(0.0, "Give each pair preference_prob = sigmoid(scale x score difference), "
                                               "a soft label (0: hard labels).")
    eval_samples_per_prompt: int = option(1, "Completions per held-out prompt when evaluating each round.")
    annotate_db: str | None = option(None, "Judge by people: the annotation database (as for preftune annotate); "
                                           "each round's candidates become one project item per prompt.")
    project: str | None = option(None, "Annotation project name (with --annotate_db); round r uses "
                                       "'<project>-round<r>'.")
    annotate_kind: str = option("rating", "Question asked: rate each candidate 1-7, or rank them.",
                                choices=["rating", "ranking"])
    annotate_overlap: int = option(1, "Annotators who label each item.")
    annotate_timeout: float = option(0.0, "Seconds to wait for the labels of a round (0: until every item has them); "
                                          "after it, unlabelled prompts are left out and counted.")
    annotate_poll_seconds: float = option(5.0, "How often to look for new labels.")

    def validate_loss(self) -> None:
        if self.loss_type == "kto":
            KTOConfig.validate_loss(self)
        else:
            super().validate_loss()

    def usual_beta(self) -> tuple[float, float]:
        return KTOConfig.usual_beta(self) if self.loss_type == "kto" else super().usual_beta()

    def validate(self, require_model: bool = True) -> None:
        if self.loss_type == "kto":
            check_ranges(self, positive_numbers=["desirable_weight", "undesirable_weight"])
        super().validate(require_model)
        check_ranges(self, positive=["rounds", "samples_per_prompt", "max_new_tokens", "sampling_batch_size",
                                     "eval_samples_per_prompt", "annotate_overlap", "annotate_poll_seconds"],
                     non_negative=["min_score_gap", "margin_scale", "preference_prob_scale", "annotate_timeout"],
                     positive_numbers=["temperature"])
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be at least 2 (pairs need two samples), got "
                              f"{self.samples_per_prompt}")
        if self.annotate_db and not self.project:
            raise ConfigError("--annotate_db needs --project (the annotation project's name)")
        if self.annotate_db and self.judge:
            raise ConfigError("give either --judge (a scorer) or --annotate_db (people), not both")
        if self.loss_type == "kto" and (self.margin_scale or self.preference_prob_scale):
            raise ConfigError("margin_scale and preference_prob_scale label pairs; KTO takes single examples")
        if self.loss_type == "kto" and (self.ld_alpha is not None or self.use_weighting):
            raise ConfigError("ld_alpha (LD-DPO) and use_weighting (WPO) are options of the pairwise DPO losses; "
                              "KTO does not use them")
        if self.max_prompt_length is not None and self.max_prompt_length + self.max_new_tokens > self.max_length:
            raise ConfigError(f"max_prompt_length + max_new_tokens ({self.max_prompt_length} + {self.max_new_tokens})"
                              f" must not exceed max_length ({self.max_length})")
        self.check_replies()
        if self.loss_type == "kto" and self.eos_mode() == "keep":
            raise ConfigError("missing_eos: keep marks pairs whose replies never ended; KTO examples carry no such "
                              "mark: use drop or penalize with loss_type kto")
        if not math.isfinite(self.annotate_timeout):
            raise ConfigError("annotate_timeout must be a finite number of seconds")

    def prompt_limit(self) -> int:
        """Prompt tokens kept when sampling (the end of a longer prompt)."""
        return self.max_prompt_length or max(1, self.max_length - self.max_new_tokens)
