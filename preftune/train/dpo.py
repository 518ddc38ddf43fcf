"""DPO and its family on the shared loop: a batch of pairs becomes one concatenated forward and a loss.

Chosen and rejected sequences go through the policy together; the loss function is picked by name
from :mod:`preftune.losses`; the reference is a frozen model, the LoRA policy with its adapters
disabled, or log-probs precomputed once and cached (``precompute_ref``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from ..config import DPOConfig, config_to_dict, parse_constraint_spec
from ..data.split import hold_out, report_skipped
from ..data import TokenizedPair, TokenizeSettings, collate_pairs, load_records, tokenize_preferences
from ..losses import REFERENCE_FREE, PreferenceLogps, load_constraint, preference_loss
from ..models import compute_dtype, disable_dropout, freeze, is_peft_model, load_causal_lm, load_tokenizer, \
    model_fingerprint, prepare_policy
from .loop import Trainer
from .run import RunResult, finish_run, save_final_model, start_run
from .policy import PolicyLogprobs
from .reference import Reference, cache_key, default_cache_dir, describe, precompute_reference, write_description

console = Console(stderr=True)


@dataclass
class PairExample:
    pair: TokenizedPair
    ref_chosen: float | None = None
    ref_rejected: float | None = None


class DPOTask:
    """Turns a batch of pairs into the configured preference loss and its metrics."""

    def __init__(self, cfg: DPOConfig, pad_token_id: int, reference: Reference | None):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.constraints = [(load_constraint(target), weight) for target, weight in map(parse_constraint_spec, cfg.constraints)]
        self.needs_reference = cfg.loss_type not in REFERENCE_FREE

    def collate(self, examples: list[PairExample]) -> dict[str, torch.Tensor]:
        batch = collate_pairs([e.pair for e in examples], self.pad_token_id)
        if self.needs_reference and examples[0].ref_chosen is not None:
            batch["ref_chosen"] = torch.tensor([e.ref_chosen for e in examples], dtype=torch.float32)
            batch["ref_rejected"] = torch.tensor([e.ref_rejected for e in examples], dtype=torch.float32)
        return batch

    def logps(self, model, batch) -> PreferenceLogps:
        token_logps = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        sums = token_logps.sum(-1)
        lengths = batch["completion_mask"].sum(-1).float()
        half = sums.shape[0] // 2
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            if "ref_chosen" in batch:
                ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
            else:
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
        return preference_loss(self.cfg.loss_type, lp, self.cfg.beta, label_smoothing=self.cfg.label_smoothing,
                               simpo_gamma=self.cfg.simpo_gamma, nll_weight=self.cfg.nll_weight,
                               constraints=self.constraints)

    def eval_metrics(self, model, batch):
        return self.loss(model, batch)[1]


def _tokenize(source: str, split: str, tokenizer, settings: TokenizeSettings, skip_invalid: bool) -> list[TokenizedPair]:
    records = load_records(source, split=split)
    pairs, report = tokenize_preferences(records, tokenizer, settings, skip_invalid=skip_invalid)
    report_skipped(records.name, report)
    return pairs


def load_pairs(cfg: DPOConfig, tokenizer) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    settings = TokenizeSettings(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                truncation_mode=cfg.truncation_mode)
    train = _tokenize(cfg.dataset, cfg.split, tokenizer, settings, cfg.skip_invalid)
    if cfg.eval_dataset:
        return train, _tokenize(cfg.eval_dataset, cfg.eval_split, tokenizer, settings, cfg.skip_invalid)
    return hold_out(train, cfg.eval_fraction, cfg.seed)


def train_dpo(cfg: DPOConfig, *, model=None, tokenizer=None, ref_model=None) -> RunResult:
    """Train a policy on preference pairs. ``model``/``tokenizer``/``ref_model`` may be passed as objects."""
    cfg.validate(require_model=model is None)
    ctx = start_run(cfg, cfg.sanity_warnings())
    accelerator = ctx.accelerator
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    train_pairs, eval_pairs = load_pairs(cfg, tokenizer)

    policy = model if model is not None else load_causal_lm(cfg.model_name_or_path)
    needs_reference = cfg.loss_type not in REFERENCE_FREE
    if needs_reference and ref_model is None and not (cfg.lora and not cfg.ref_model_name_or_path):
        if cfg.ref_model_name_or_path:
            ref_model = load_causal_lm(cfg.ref_model_name_or_path, compute_dtype(ctx.precision))
        elif model is not None:
            ref_model = copy.deepcopy(model)
        else:
            ref_model = load_causal_lm(cfg.model_name_or_path, compute_dtype(ctx.precision))
    policy = prepare_policy(policy, cfg)
    reference = None
    if needs_reference:
        if ref_model is not None:
            disable_dropout(ref_model)
            reference = Reference(model=freeze(ref_model).to(accelerator.device), chunk_size=cfg.logprob_chunk_size)
        else:
            reference = Reference(adapter_policy=policy.to(accelerator.device), chunk_size=cfg.logprob_chunk_size)

    task = DPOTask(cfg, tokenizer.pad_token_id, reference)
    train_examples = [PairExample(p) for p in train_pairs]
    eval_examples = [PairExample(p) for p in eval_pairs]
    if needs_reference and cfg.precompute_ref:
        _attach_precomputed(cfg, ctx.precision, reference, ref_model if ref_model is not None else policy,
                            task, accelerator, ctx.run_dir, {"train": train_examples, "eval": eval_examples})
        if reference.model is not None:
            reference.model = None  # no longer needed: free its memory
            ref_model = None
        task.reference = None

    trainer = Trainer(accelerator=accelerator, model=PolicyLogprobs(policy, cfg.logprob_chunk_size), task=task,
                      train_examples=train_examples, eval_examples=eval_examples, settings=cfg, run_dir=ctx.run_dir,
                      config_dict=config_to_dict(cfg), count_tokens=lambda b: int(b["attention_mask"].sum()))
    result = trainer.train()
    model_dir = save_final_model(accelerator, trainer.unwrapped().model, tokenizer, ctx.run_dir / "model", cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


def _attach_precomputed(cfg, precision, reference, ref_identity_model, task, accelerator, run_dir, splits) -> None:
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    ref_name = cfg.ref_model_name_or_path or cfg.model_name_or_path
    fingerprint = model_fingerprint(_base_of(ref_identity_model), ref_name)
    described = {}
    for split, examples in splits.items():
        if not examples:
            continue
        pairs = [e.pair for e in examples]
        path = cache_root / f"{cache_key(fingerprint, pairs, precision)}.safetensors"
        cached = precompute_reference(reference, pairs, lambda ps: collate_pairs(ps, task.pad_token_id),
                                      cfg.per_device_batch_size, accelerator.device, path, accelerator)
        for example, c, r in zip(examples, cached.chosen.tolist(), cached.rejected.tolist()):
            example.ref_chosen, example.ref_rejected = c, r
        described[split] = describe(cached)
        if accelerator.is_main_process:
            state = "reused cached" if cached.hit else "computed and cached"
            console.print(f"reference log-probs ({split}): {state} at {cached.path}")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_description(run_dir, described)


def _base_of(model):
    """The frozen base weights a reference uses (a peft policy's base model)."""
    return model.get_base_model() if is_peft_model(model) else model
