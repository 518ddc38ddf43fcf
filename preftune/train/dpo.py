"""DPO and its family on the shared loop: a batch of pairs becomes one concatenated forward and a loss.

Chosen and rejected sequences go through the policy together (by default as one packed row of blocks
``prompt | chosen | rejected``: each prompt encoded once, no padding); the loss function is picked by name
from :mod:`preftune.losses`; the reference is a frozen model, the LoRA policy with its adapters
disabled, or log-probs precomputed once and cached (``precompute_ref``).
"""

from __future__ import annotations

import torch

from ..config import DPOConfig, parse_constraint_spec
from ..config.losses import loss_options, needs_reference
from ..data import TokenizedPair, tokenize_preferences
from ..data.images import uses_images
from ..losses import PreferenceLogps, load_constraint, preference_loss
from ..models import load_causal_lm, load_tokenizer, prepare_policy
from .loop import Trainer
from .policy import PairCollator, PolicyLogprobs, sequence_sums
from .reference import Reference, make_reference
from .run import RunResult, finish_run, save_final_model, start_run, tokenized_reader, train_and_eval


class DPOTask:
    """Turns a batch of pairs into the configured preference loss and its metrics."""

    def __init__(self, cfg: DPOConfig, pad_token_id: int, reference: Reference, policy=None):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.collator = PairCollator.for_model(cfg, pad_token_id, policy)   # padded without a policy
        self.constraints = [(load_constraint(target), weight)
                            for target, weight in map(parse_constraint_spec, cfg.constraints)]

    def collate(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return self.collator(pairs)

    def sequence_sums(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(summed log-probs, completion lengths)`` per sequence (a vision task runs its own batch)."""
        return sequence_sums(model, batch)

    def logps(self, model, batch) -> PreferenceLogps:
        sums, lengths = self.sequence_sums(model, batch)
        half = sums.shape[0] // 2
        ref_chosen = ref_rejected = None
        if self.reference.kind != "none":
            ref = self.reference.sequence_logps(batch)
            ref_chosen, ref_rejected = ref[:half], ref[half:]
        probs = batch["preference_prob"]
        return PreferenceLogps(
            policy_chosen=sums[:half], policy_rejected=sums[half:], ref_chosen=ref_chosen, ref_rejected=ref_rejected,
            chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
            preference_prob=None if bool(probs.isnan().all()) else probs,   # NaN: the row has none
            margin=batch["margin"] if bool((batch["margin"] != 0).any()) else None,
        )

    def loss(self, model, batch):
        lp = self.logps(model, batch)
        return preference_loss(self.cfg.loss_type, lp, self.cfg.beta, loss_weights=self.cfg.loss_weights,
                               nll_weight=self.cfg.nll_weight, constraints=self.constraints, **loss_options(self.cfg))

    def eval_metrics(self, model, batch):
        return self.loss(model, batch)[1]


def load_pairs(cfg: DPOConfig, tokenizer) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    return train_and_eval(cfg, tokenized_reader(cfg, tokenizer, tokenize_preferences))


def train_dpo(cfg: DPOConfig, *, model=None, tokenizer=None, ref_model=None) -> RunResult:
    """Train a policy on preference pairs. ``model``/``tokenizer``/``ref_model`` may be passed as objects."""
    cfg.validate(require_model=model is None)
    if uses_images(cfg):   # pass a vision-language model's processor as ``tokenizer``
        from .vision import train_vision_dpo

        return train_vision_dpo(cfg, model=model, processor=tokenizer, ref_model=ref_model)
    ctx = start_run(cfg, cfg.sanity_warnings())
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    train_pairs, eval_pairs = load_pairs(cfg, tokenizer)

    policy = prepare_policy(model if model is not None else load_causal_lm(cfg.model_name_or_path), cfg)
    splits = {"train": pair_sequences(train_pairs), "eval": pair_sequences(eval_pairs)} if cfg.precompute_ref else None
    reference = make_reference(cfg, ctx, policy, ref_model=ref_model, needed=needs_reference(cfg.loss_type),
                               precompute=splits, pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer.from_run(ctx, model=PolicyLogprobs(policy, cfg.logprob_chunk_size),
                               task=DPOTask(cfg, tokenizer.pad_token_id, reference, policy), train_examples=train_pairs,
                               eval_examples=eval_pairs)
    result = trainer.train()
    model_dir = save_final_model(ctx.accelerator, trainer.unwrapped().model, tokenizer, ctx.run_dir / "model",
                                 cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


def pair_sequences(pairs: list[TokenizedPair]) -> list[tuple[list[int], list[int]]]:
    """Every pair's (prompt, chosen) and (prompt, rejected) sequences, for precomputed reference log-probs."""
    return [(p.prompt_ids, completion) for p in pairs for completion in (p.chosen_ids, p.rejected_ids)]
