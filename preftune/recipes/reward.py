"""Reward models: a scalar head on a transformer, trained on preference pairs.

The model is ``AutoModelForSequenceClassification`` with one output on any backbone; how a sequence's
reward is read (last token for decoders, [CLS] for encoders) and how trained models are loaded and
used to score responses is :mod:`preftune.scoring.reward_model`. Sequences are tokenised exactly as
for DPO (``preftune.data``): prompt ids, then response ids, then EOS.
"""

from __future__ import annotations

import torch
from rich.console import Console
from torch import nn

from ..config import RewardConfig
from ..data.images import uses_images
from ..data.packed import PackedLayout, is_packed
from ..losses import reward_loss
from ..modality.text import PairCollator
from ..models import base_model, load_tokenizer, prepare_policy
from ..runtime.loop import Trainer
from ..runtime.run import RunResult, finish_run, save_final_model, start_run
from ..scoring import reward_model as rm
from ..speed.attention import packed_model_inputs
from .dpo import load_pairs

console = Console(stderr=True)


class RewardScorer(nn.Module):
    """Token ids -> rewards; the loop prepares (and under data parallelism wraps) this module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None, position_ids=None, prompt_lengths=None,
                completion_lengths=None) -> torch.Tensor:
        if completion_lengths is not None:
            return packed_rewards(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                               "position_ids": position_ids, "prompt_lengths": prompt_lengths,
                                               "completion_lengths": completion_lengths})
        return rm.sequence_rewards(self.model, input_ids, attention_mask, token_type_ids)


def packed_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float32 reward per sequence of a packed batch (a decoder classifier: its head on each sequence's
    last token), in the batch's sequence order; equal to :func:`sequence_rewards` on padded rows."""
    hf = base_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], use_cache=False, **packed_model_inputs(hf, batch))
    last = PackedLayout.of(batch).last_positions().to(batch["input_ids"].device)
    return hf.score(hidden.last_hidden_state[0, last]).squeeze(-1).float()


def prepare_reward_model(model, cfg):
    """Dropout, gradient checkpointing and LoRA (the head is trained in full: ``modules_to_save``)."""
    return prepare_policy(model, cfg, task_type="SEQ_CLS", modules_to_save=[rm.head_name(model)])


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

    def __init__(self, cfg: RewardConfig, pad_token_id: int, model=None):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        decoder = model is not None and rm.reads_last_token(model)   # encoders read [CLS]: padded rows
        self.collator = PairCollator.for_model(cfg, pad_token_id, model if decoder else None)

    def collate(self, pairs) -> dict[str, torch.Tensor]:
        return self.collator(pairs)

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if is_packed(batch):
            rewards = model(batch["input_ids"], batch["attention_mask"], None,
                            *(batch[key] for key in ("position_ids", "prompt_lengths", "completion_lengths")))
        else:
            rewards = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"].long())
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
    """Train a reward model on preference pairs. ``model``/``tokenizer`` may be passed as objects."""
    cfg.validate(require_model=model is None)
    if uses_images(cfg):   # pass a vision-language model's processor as ``tokenizer``
        from ..modality.vision import train_vision_reward

        return train_vision_reward(cfg, model=model, processor=tokenizer)
    ctx = start_run(cfg, cfg.sanity_warnings())
    tokenizer = rm.prepare_tokenizer(tokenizer or load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path))
    train_pairs, eval_pairs = load_pairs(cfg, tokenizer)
    if cfg.loss_type != "soft_label" and any(p.preference_prob < 1 for p in train_pairs) and ctx.is_main_process:
        console.print(f"[yellow]warning:[/] the data has preference_prob values below 1, which "
                      f"loss_type={cfg.loss_type} ignores (it treats every pair as certain); use --loss_type "
                      "soft_label to use them")
    if model is None:
        torch.manual_seed(cfg.seed)  # the new head's initial weights
        model = rm.load_classifier(cfg.model_name_or_path, new_head=True)
    rm.check_reward_model(model)
    rm.distinct_pad_token(tokenizer)   # saved with the model: the reward is read at EOS, here and by transformers
    model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_reward_model(model, cfg)
    trainer = Trainer.from_run(ctx, model=RewardScorer(model), task=RewardTask(cfg, tokenizer.pad_token_id, model),
                               train_examples=train_pairs, eval_examples=eval_pairs)
    result = trainer.train()
    model_dir = save_final_model(ctx.accelerator, trainer.unwrapped().model, tokenizer, ctx.run_dir / "model",
                                 cfg.merge_lora)
    return finish_run(ctx, model_dir, result)
