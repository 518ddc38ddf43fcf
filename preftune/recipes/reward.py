"""Reward models: a scalar head on a transformer, trained on preference pairs.

The model is ``AutoModelForSequenceClassification`` with one output on any backbone; how a sequence's
reward is read (last token for decoders, [CLS] for encoders) and how trained models are loaded and
used to score responses is :mod:`preftune.scoring.reward_model`. Sequences are tokenised exactly as
for DPO (``preftune.data``): prompt ids, then response ids, then EOS. With images the modality
(:mod:`preftune.modality.vision`) puts a linear head on a vision-language backbone, read at each
sequence's last token, and saves it beside the model as ``reward_head.safetensors``.
"""

from __future__ import annotations

import torch
from rich.console import Console

from ..config import RewardConfig
from ..losses import reward_loss
from ..modality import TEXT, Modality, modality_for
from ..runtime.loop import Trainer
from ..runtime.run import RunResult, finish_run, save_final_model, start_run
from .dpo import load_pairs

console = Console(stderr=True)


# ---------------------------------------------------------------------- training


def expected_calibration_error(probs: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> float:
    """ECE of the predicted probability that the chosen response is preferred.

    q_i = σ(r_c - r_r); the outcome y_i is 1 ("chosen is preferred") for hard labels and the row's
    preference_prob for soft labels. With bins B_k = [k/10, (k+1)/10) (the last one includes 1),

        ECE = Σ_k (|B_k| / N) · |mean_{i∈B_k} q_i - mean_{i∈B_k} y_i|.

    With hard labels only, every outcome is 1 and ECE = 1 - mean(q): it measures under-confidence.
    """
    probs, outcomes = probs.double().flatten(), outcomes.double().flatten()
    if probs.numel() == 0:
        return float("nan")
    index = (probs * bins).floor().long().clamp(0, bins - 1)
    total = 0.0
    for k in range(bins):
        chosen = index == k
        if bool(chosen.any()):
            gap = (probs[chosen].mean() - outcomes[chosen].mean()).abs()
            total += float(chosen.sum()) / probs.numel() * float(gap)
    return total


class RewardTask:
    """Chosen and rejected in one forward; the configured reward loss and its metrics."""

    def __init__(self, cfg: RewardConfig, pad_token_id: int, model=None, modality: Modality = TEXT):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.modality = modality
        self.collator = modality.reward_collator(cfg, pad_token_id, model)   # ``model``: the backbone; None: padded

    def collate(self, pairs) -> dict[str, torch.Tensor]:
        return self.collator(pairs)

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self.modality.rewards(model, batch)
        half = rewards.shape[0] // 2
        return rewards[:half], rewards[half:]

    def _loss(self, chosen, rejected, batch):
        return reward_loss(self.cfg.loss_type, chosen, rejected, margin=batch["margin"],
                           preference_prob=batch["preference_prob"].nan_to_num(1.0), ranking_margin=self.cfg.margin,
                           centering_coef=self.cfg.centering_coef)

    def loss(self, model, batch):
        return self._loss(*self.rewards(model, batch), batch)

    def eval_metrics(self, model, batch):
        chosen, rejected = self.rewards(model, batch)
        metrics = self._loss(chosen, rejected, batch)[1]
        metrics["prob_chosen"] = torch.sigmoid(chosen - rejected).detach()   # per pair, for eval_summary
        metrics["outcome"] = batch["preference_prob"].nan_to_num(1.0)   # NaN: no column, a hard label
        return metrics

    def eval_summary(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        if not outputs:
            return {}
        probs = torch.cat([o["prob_chosen"] for o in outputs])
        outcomes = torch.cat([o["outcome"] for o in outputs])
        return {"ece": expected_calibration_error(probs, outcomes)}


def train_reward(cfg: RewardConfig, *, model=None, tokenizer=None) -> RunResult:
    """Train a reward model on preference pairs. ``model``/``tokenizer`` may be passed as objects (with images: a
    vision-language model and its processor)."""
    cfg.validate(require_model=model is None)
    modality = modality_for(cfg)
    ctx = start_run(cfg, cfg.sanity_warnings())
    processor = modality.reward_processor(tokenizer or modality.load_processor(cfg.tokenizer_name_or_path
                                                                               or cfg.model_name_or_path))
    train_pairs, eval_pairs = load_pairs(cfg, processor, modality)
    if cfg.loss_type != "soft_label" and any(p.preference_prob < 1 for p in train_pairs) and ctx.is_main_process:
        console.print(f"[yellow]warning:[/] the data has preference_prob values below 1, which "
                      f"loss_type={cfg.loss_type} ignores (it treats every pair as certain); use --loss_type "
                      "soft_label to use them")
    scorer = modality.reward_scorer(cfg, model, processor)
    pad = modality.tokenizer_of(processor).pad_token_id
    trainer = Trainer.from_run(ctx, model=scorer, task=RewardTask(cfg, pad, scorer.model, modality),
                               train_examples=train_pairs, eval_examples=eval_pairs)
    result = trainer.train()
    model_dir = save_final_model(ctx.accelerator, trainer.unwrapped().model, processor, ctx.run_dir / "model",
                                 cfg.merge_lora)
    if ctx.is_main_process:
        modality.save_reward(trainer.unwrapped(), model_dir)
    return finish_run(ctx, model_dir, result)
