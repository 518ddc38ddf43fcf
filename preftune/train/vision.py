"""DPO, reward models and SFT on data with images, over the same loop, losses and tasks as text.

``train_dpo``, ``train_reward`` and ``train_sft`` come here when their data has images
(:func:`uses_images`). What differs from text is only how rows are read (the model's processor,
:mod:`preftune.multimodal.data`), how a batch becomes log-probs or rewards (images encoded once per pair,
:mod:`preftune.multimodal.logprobs`), which weights train (:mod:`preftune.multimodal.models`) and the
reference's cache key (:mod:`.vision_reference`);
the tasks below are the text tasks with those pieces swapped in.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

from ..config.losses import needs_reference
from ..multimodal.data import (
    collate_vision_examples,
    collate_vision_pairs,
    tokenize_vision_examples,
    tokenize_vision_pairs,
)
from ..multimodal.logprobs import VisionLogprobs, VisionRewardScorer
from ..multimodal.models import load_processor, load_vision_model, prepare_vision_policy
from .dpo import DPOTask
from .loop import Trainer
from .reference import make_reference
from .reward import RewardTask
from .run import RunResult, finish_run, save_final_model, start_run, tokenized_reader, train_and_eval
from .sft import LMTask
from .vision_reference import VisionLiveReference, precompute_vision_reference


class VisionDPOTask(DPOTask):
    def collate(self, pairs):
        return collate_vision_pairs(pairs, self.pad_token_id)

    def sequence_sums(self, model, batch):
        return model(batch).sum(-1), batch["completion_mask"].sum(-1).float()


class VisionRewardTask(RewardTask):
    def collate(self, pairs):
        return collate_vision_pairs(pairs, self.pad_token_id)

    def rewards(self, model, batch):
        return model(batch).chunk(2)


class VisionLMTask(LMTask):
    def collate(self, examples):
        return collate_vision_examples(examples, self.pad_token_id)

    def nll(self, model, batch):
        return -model(batch).sum(-1), batch["loss_mask"][:, 1:].sum(-1).float()


def _setup(cfg, model, processor, tokenize):
    ctx = start_run(cfg, cfg.sanity_warnings())
    processor = processor or load_processor(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    train, held = train_and_eval(cfg, tokenized_reader(cfg, processor, tokenize))
    model = model if model is not None else load_vision_model(cfg.model_name_or_path)
    return ctx, processor, train, held, model


def _finish(ctx, cfg, trainer, model, processor) -> RunResult:
    result = trainer.train()
    model_dir = save_final_model(ctx.accelerator, model, processor, ctx.run_dir / "model", cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


def train_vision_dpo(cfg, *, model=None, processor=None, ref_model=None) -> RunResult:
    """DPO (and its family) on pairs whose prompts hold images."""
    ctx, processor, train, held, model = _setup(cfg, model, processor, tokenize_vision_pairs)
    policy = prepare_vision_policy(model, cfg)
    pad = processor.tokenizer.pad_token_id
    live = make_reference(cfg, ctx, policy, ref_model=ref_model, needed=needs_reference(cfg.loss_type))
    if live.kind == "none":
        reference = live
    elif cfg.precompute_ref:
        reference = precompute_vision_reference(cfg, ctx, live, {"train": train, "eval": held}, pad)
    else:
        reference = VisionLiveReference(live)
    trainer = Trainer.from_run(ctx, model=VisionLogprobs(policy, cfg.logprob_chunk_size),
                               task=VisionDPOTask(cfg, pad, reference), train_examples=train, eval_examples=held)
    return _finish(ctx, cfg, trainer, policy, processor)


def train_vision_reward(cfg, *, model=None, processor=None) -> RunResult:
    """A reward model on a vision-language backbone: a scalar head read at each sequence's last token."""
    ctx, processor, train, held, model = _setup(cfg, model, processor, tokenize_vision_pairs)
    torch.manual_seed(cfg.seed)   # the new head's initial weights
    hidden = model.config.get_text_config().hidden_size
    scorer = VisionRewardScorer(prepare_vision_policy(model, cfg), nn.Linear(hidden, 1))
    trainer = Trainer.from_run(ctx, model=scorer, task=VisionRewardTask(cfg, processor.tokenizer.pad_token_id),
                               train_examples=train, eval_examples=held)
    result = _finish(ctx, cfg, trainer, scorer.model, processor)
    if ctx.is_main_process:
        head = {k: v.contiguous() for k, v in trainer.unwrapped().head.state_dict().items()}
        save_file(head, str(result.model_dir / "reward_head.safetensors"))
    return result


def train_vision_sft(cfg, *, model=None, processor=None) -> RunResult:
    """Supervised fine-tuning on prompts with images; the loss covers the completion tokens only."""
    ctx, processor, train, held, model = _setup(cfg, model, processor, tokenize_vision_examples)
    lm = VisionLogprobs(prepare_vision_policy(model, cfg), cfg.logprob_chunk_size)
    trainer = Trainer.from_run(ctx, model=lm, task=VisionLMTask(processor.tokenizer.pad_token_id, packed=False),
                               train_examples=train, eval_examples=held, unit="samples")
    return _finish(ctx, cfg, trainer, lm.model, processor)
