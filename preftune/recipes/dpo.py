"""DPO and its family on the shared loop: a batch of pairs becomes one concatenated forward and a loss.

Chosen and rejected sequences go through the policy together (by default as one packed row of blocks
``prompt | chosen | rejected``: each prompt encoded once, no padding); the loss function is picked by name
from :mod:`preftune.losses`; the reference is a frozen model, the LoRA policy with its adapters
disabled, or log-probs precomputed once and cached (``precompute_ref``). Prompts with images take the
same path: the modality (:func:`preftune.modality.modality_for`) reads, collates and runs them.
"""

from __future__ import annotations

import torch

from ..config import DPOConfig, parse_constraint_spec
from ..config.losses import loss_options, needs_reference
from ..data import TokenizedPair
from ..errors import ConfigError
from ..losses import PreferenceLogps, load_constraint, preference_loss
from ..losses.weighting import wpo_weights
from ..modality import SUMS, TEXT, CompletionLogprobs, Modality, completion_lengths, modality_for
from ..runtime.loop import OfflineStep, Trainer
from ..runtime.reference import Reference, make_reference, sync_reference
from ..runtime.run import RunResult, finish_run, save_final_model, start_run, tokenized_reader, train_and_eval
from ..speed.head import STAT_COLUMNS


class DPOTask:
    """Turns a batch of pairs into the configured preference loss and its metrics."""

    def __init__(self, cfg: DPOConfig, pad_token_id: int, reference: Reference, policy=None,
                 modality: Modality = TEXT):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.modality = modality
        self.collator = modality.pair_collator(cfg, pad_token_id, policy)   # padded without a policy
        self.constraints = [(load_constraint(target), weight)
                            for target, weight in map(parse_constraint_spec, cfg.constraints)]

    def collate(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return self.collator(pairs)

    def logps(self, model, batch) -> PreferenceLogps:
        out = model(batch, SUMS, with_stats=True)   # the stats: TRL's per-token metrics (token_metrics)
        sums, lengths = out.values, completion_lengths(batch).to(out.values.device)
        half = sums.shape[0] // 2
        self.token_stats = out.stats, half
        ref_chosen = ref_rejected = None
        if self.reference.kind != "none":
            ref = self.reference.sequence_logps(batch)
            ref_chosen, ref_rejected = ref[:half], ref[half:]
        probs = batch["preference_prob"]
        return PreferenceLogps(
            pair_weights=self.wpo_weights(half) if getattr(self.cfg, "use_weighting", False) else None,
            policy_chosen=sums[:half], policy_rejected=sums[half:], ref_chosen=ref_chosen, ref_rejected=ref_rejected,
            chosen_lengths=lengths[:half], rejected_lengths=lengths[half:],
            preference_prob=None if bool(probs.isnan().all()) else probs,   # NaN: the row has none
            margin=batch["margin"] if bool((batch["margin"] != 0).any()) else None,
        )

    def wpo_weights(self, pairs: int) -> torch.Tensor:
        """WPO's per-pair weights from this forward's token statistics (``losses.weighting.wpo_weights``)."""
        stats, _ = self.token_stats
        if stats is None:
            raise ConfigError("use_weighting (WPO) needs the per-token statistics of preftune's text log-prob module")
        values, sequence = stats
        return wpo_weights(values[:, STAT_COLUMNS.index("wpo_aligned")], sequence, pairs)

    def loss(self, model, batch):
        lp = self.logps(model, batch)
        loss, metrics = preference_loss(self.cfg.loss_type, lp, self.cfg.beta, loss_weights=self.cfg.loss_weights,
                                        nll_weight=self.cfg.nll_weight, constraints=self.constraints,
                                        **loss_options(self.cfg))
        return loss, {**metrics, **token_metrics(*self.token_stats)}

    def eval_metrics(self, model, batch):
        return self.loss(model, batch)[1]


def token_metrics(stats, pairs: int) -> dict[str, torch.Tensor]:
    """TRL's per-token DPO metrics from the head's :func:`~preftune.speed.head.token_stats` (sequences ``< pairs``
    are the chosen ones): the mean logit of chosen and of rejected tokens, the share of chosen tokens that are
    the policy's most likely token, and the mean entropy over all completion tokens. None: no metrics."""
    if stats is None:
        return {}
    values, sequence = stats
    chosen = sequence.to(values.device) < pairs

    def mean(column: int, where: torch.Tensor) -> torch.Tensor:
        return values[where, column].mean() if bool(where.any()) else values.new_tensor(0.0)

    return {"logits/chosen": mean(0, chosen), "logits/rejected": mean(0, ~chosen),
            "mean_token_accuracy": mean(1, chosen), "entropy": mean(2, torch.ones_like(chosen))}


def load_pairs(cfg: DPOConfig, processor, modality: Modality = TEXT, whole_turn: bool = False) -> tuple[list, list]:
    """Training and held-out pairs (``whole_turn``: a reward model's conversations, see ``TokenizeSettings``)."""
    return train_and_eval(cfg, tokenized_reader(cfg, processor, modality.tokenize_pairs, whole_turn))


def train_dpo(cfg: DPOConfig, *, model=None, tokenizer=None, ref_model=None) -> RunResult:
    """Train a policy on preference pairs. ``model``/``tokenizer``/``ref_model`` may be passed as objects (with
    images: a vision-language model and its processor)."""
    cfg.validate(require_model=model is None)
    modality = modality_for(cfg)
    if modality is not TEXT and (cfg.ld_alpha is not None or cfg.use_weighting):
        raise ConfigError("ld_alpha (LD-DPO) and use_weighting (WPO) are options of text pairs; this dataset has "
                          "images")
    ctx = start_run(cfg, cfg.sanity_warnings())
    processor = tokenizer or modality.load_processor(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg)
    pad = modality.tokenizer_of(processor).pad_token_id
    train_pairs, eval_pairs = load_pairs(cfg, processor, modality)

    model = model if model is not None else modality.load_model(cfg.model_name_or_path, settings=cfg)
    policy = modality.prepare_policy(model, cfg)
    splits = ({"train": pair_sequences(train_pairs, modality), "eval": pair_sequences(eval_pairs, modality)}
              if cfg.precompute_ref else None)
    reference = make_reference(cfg, ctx, policy, ref_model=ref_model, needed=needs_reference(cfg.loss_type),
                               precompute=splits, pad_token_id=pad, modality=modality)
    trainer = Trainer.from_run(ctx, model=CompletionLogprobs(policy, modality, cfg.logprob_chunk_size),
                               task=DPOTask(cfg, pad, reference, policy, modality), train_examples=train_pairs,
                               eval_examples=eval_pairs,
                               step=ReferenceSync(cfg, reference) if cfg.sync_ref_model else None)
    result = trainer.train()
    model_dir = save_final_model(ctx.accelerator, trainer.unwrapped().model, processor, ctx.run_dir / "model",
                                 cfg.merge_lora)
    return finish_run(ctx, model_dir, result)


def pair_sequences(pairs: list[TokenizedPair], modality: Modality = TEXT) -> list[tuple]:
    """Every pair's (prompt, chosen) and (prompt, rejected) sequences, for precomputed reference log-probs."""
    return [(modality.prompt(p), completion) for p in pairs for completion in (p.chosen_ids, p.rejected_ids)]


class ReferenceSync(OfflineStep):
    """TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"): the loop's default
    step, then every ``ref_model_sync_steps``-th step the frozen reference moves towards the policy
    (:func:`~preftune.runtime.reference.sync_reference`). Its weights are the step's checkpointed tensors, so a
    resumed run continues from the synced reference."""

    def __init__(self, cfg: DPOConfig, reference: Reference):
        self.cfg = cfg
        self.reference = reference

    def run(self, trainer: Trainer, step: int):
        out = super().run(trainer, step)
        if (step + 1) % self.cfg.ref_model_sync_steps == 0:
            with torch.no_grad():
                sync_reference(self.reference, trainer.unwrapped().model, self.cfg.ref_model_mixup_alpha)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.reference.model.named_parameters())

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, weight in self.tensors().items():
            weight.copy_(tensors[name])
