"""KTO on the shared loop: labelled completions (and mismatched ones for z₀) in one forward, then the loss.

Each example is scored twice in the same concatenated forward: its own completion and, for KTO's
reference point, another example's completion after its prompt (:func:`mismatched_completions`).
An example is therefore held as a :class:`TokenizedPair` (own completion in the ``chosen`` slot,
mismatched one in the ``rejected`` slot), so the batching of ``preftune dpo`` serves it unchanged.
z₀ is averaged over the mismatched completions of every process's micro-batch (gathered), so the
loss does not depend on how the batch is split across devices; with gradient accumulation it is
estimated per micro-batch. The reference comes from :func:`make_reference`, as for DPO: a frozen
model, the LoRA policy with adapters disabled, or log-probs precomputed once and cached
(``precompute_ref``), the mismatched completions' included. Prompts with images take the same path
through their modality (:func:`preftune.modality.modality_for`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from rich.console import Console

from ..config import KTOConfig
from ..data import TokenizedPair
from ..data.kto import KTOExample, label_counts, mismatched_completions
from ..losses import kto_loss, kto_metrics
from ..modality import TEXT, CompletionLogprobs, Modality, modality_for, sequence_sums
from ..runtime.loop import Trainer
from ..runtime.reference import Reference, Sequence, make_reference
from ..runtime.run import RunResult, finish_run, save_final_model, start_run, tokenized_reader, train_and_eval

console = Console(stderr=True)


@dataclass
class KTOItem:
    """One example as the loop sees it. ``pair``: prompt, own completion (``chosen_ids``) and the
    mismatched completion (``rejected_ids``)."""

    pair: TokenizedPair   # or its modality's pair (a prompt with images)
    desirable: bool
    weight: float = 1.0


def make_items(examples: list[KTOExample], seed: int, max_length: int, modality: Modality = TEXT) -> list[KTOItem]:
    mismatched = mismatched_completions(examples, seed, max_length)
    return [KTOItem(modality.pair(modality.prompt(e), e.completion_ids, other, e.row), e.desirable,
                    getattr(e, "weight", 1.0))
            for e, other in zip(examples, mismatched)]


def item_sequences(items: list[KTOItem], kto_kl: bool, modality: Modality = TEXT) -> list[Sequence]:
    """The (prompt, completion) sequences a run scores: each own completion, and with ``kto_kl`` right after it
    the mismatched one (same prompt: the two share a block when precomputed with prefix sharing)."""
    completions = (lambda pair: (pair.chosen_ids, pair.rejected_ids)) if kto_kl else (lambda pair: (pair.chosen_ids,))
    return [(modality.prompt(item.pair), ids) for item in items for ids in completions(item.pair)]


class KTOTask:
    """Turns a batch of labelled completions into the KTO loss and TRL's KTO metrics."""

    def __init__(self, cfg: KTOConfig, pad_token_id: int, reference: Reference, accelerator, policy=None,
                 modality: Modality = TEXT):
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.accelerator = accelerator
        self.modality = modality
        self.layout = modality.pair_collator(cfg, pad_token_id, policy)   # padded without a policy

    def collate(self, items: list[KTOItem]) -> dict[str, torch.Tensor]:
        """Rows 0..B-1: prompt + own completion; with ``kto_kl``, rows B..2B-1: prompt + mismatched completion."""
        pairs = [item.pair for item in items]
        if self.cfg.kto_kl:
            batch = self.layout(pairs)
        else:
            prompts, completions = [self.modality.prompt(p) for p in pairs], [p.chosen_ids for p in pairs]
            batch = self.modality.collate_completions(prompts, completions, self.pad_token_id, self.layout.packed)
            batch["row"] = torch.tensor([p.row for p in pairs], dtype=torch.long)
        batch["desirable"] = torch.tensor([item.desirable for item in items], dtype=torch.bool)
        if any(item.weight != 1.0 for item in items):
            batch["weight"] = torch.tensor([item.weight for item in items], dtype=torch.float32)
        return batch

    def logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(policy, reference) log-probs of the own completions, and log-ratios of the mismatched ones."""
        sums, _ = sequence_sums(model, batch)
        ref = self.reference.sequence_logps(batch)
        n = batch["desirable"].shape[0]
        kl = (sums[n:] - ref[n:]).detach() if self.cfg.kto_kl else None
        return sums[:n], ref[:n], kl

    def _loss(self, model, batch, gather):
        policy, ref, kl = self.logps(model, batch)
        out = kto_loss(policy, ref, batch["desirable"], self.cfg.beta, kl_logratios=None if kl is None else gather(kl),
                       desirable_weight=self.cfg.desirable_weight, undesirable_weight=self.cfg.undesirable_weight,
                       weights=batch.get("weight"))
        return out.losses.mean(), out, policy.detach()

    def loss(self, model, batch):
        gather = self.accelerator.gather  # z₀ and the metrics cover every process's micro-batch
        total, out, policy = self._loss(model, batch, gather)
        desirable = gather(batch["desirable"].float()) > 0.5
        metrics = kto_metrics(gather(out.rewards), gather(policy), desirable)
        return total, {"loss": total.detach(), "kl": out.z0.float(), **metrics}

    def eval_metrics(self, model, batch):
        total, out, policy = self._loss(model, batch, lambda t: t)
        return {"loss": total.detach(), "kl": out.z0.float(), "rewards": out.rewards.float(), "logps": policy.float(),
                "desirable": batch["desirable"].float(), "row": batch["row"].float()}

    def eval_summary(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Exact means over the whole eval set; ``rewards/accuracies`` over the pairs it holds (examples that
        share a row: is the desirable completion's reward above the undesirable one's?)."""
        joined = {key: torch.cat([o[key] for o in outputs]) for key in ("rewards", "logps", "desirable", "row")}
        desirable = joined["desirable"] > 0.5
        summary = {k: float(v) for k, v in kto_metrics(joined["rewards"], joined["logps"], desirable).items()}
        accuracy = pair_accuracy(joined["rewards"], desirable, joined["row"])
        if accuracy is not None:
            summary["rewards/accuracies"] = accuracy
        return summary


def pair_accuracy(rewards: torch.Tensor, desirable: torch.Tensor, rows: torch.Tensor) -> float | None:
    """Share of rows holding one desirable and one undesirable example where the desirable one's reward is higher."""
    by_row: dict[int, dict[bool, float]] = defaultdict(dict)
    for reward, good, row in zip(rewards.tolist(), desirable.tolist(), rows.tolist()):
        by_row[int(row)][bool(good)] = reward
    pairs = [kinds for kinds in by_row.values() if len(kinds) == 2]
    if not pairs:
        return None
    return sum(kinds[True] > kinds[False] for kinds in pairs) / len(pairs)


def weight_advice(cfg: KTOConfig, n_desirable: int, n_undesirable: int) -> str | None:
    """The paper's advice: λ_D·n_D / (λ_U·n_U) in [1, 4/3]. A warning with weights that satisfy it, or None."""
    if n_desirable == 0 or n_undesirable == 0:
        kind = "undesirable" if n_undesirable == 0 else "desirable"
        return f"the training data has no {kind} examples; KTO learns best from both kinds"
    wd, wu = cfg.desirable_weight, cfg.undesirable_weight
    ratio = wd * n_desirable / (wu * n_undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    low, high = wu * n_undesirable / n_desirable, 4 / 3 * wu * n_undesirable / n_desirable
    return (f"desirable_weight·n_desirable / (undesirable_weight·n_undesirable) = {wd:g}·{n_desirable} / "
            f"({wu:g}·{n_undesirable}) = {ratio:.3g}, outside the range [1, 4/3] the KTO paper advises; with "
            f"undesirable_weight={wu:g}, set desirable_weight between {low:.3g} and {high:.3g} "
            f"(e.g. --desirable_weight {(low + high) / 2:.3g})")


def load_examples(cfg: KTOConfig, processor, modality: Modality = TEXT) -> tuple[list[KTOExample], list[KTOExample]]:
    """Training and held-out examples; a held-out fraction takes whole rows (both halves of a pair)."""
    read = tokenized_reader(cfg, processor, modality.tokenize_labelled)

    def rows(source: str, split: str) -> list[list[KTOExample]]:
        by_row: dict[int, list[KTOExample]] = defaultdict(list)
        for example in read(source, split):
            by_row[example.row].append(example)
        return list(by_row.values())

    train, held = train_and_eval(cfg, rows)
    return [e for group in train for e in group], [e for group in held for e in group]


def train_kto(cfg: KTOConfig, *, model=None, tokenizer=None, ref_model=None) -> RunResult:
    """Train a policy with KTO. ``model``/``tokenizer``/``ref_model`` may be passed as objects (with images: a
    vision-language model and its processor)."""
    cfg.validate(require_model=model is None)
    modality = modality_for(cfg)
    ctx = start_run(cfg, cfg.sanity_warnings())
    processor = tokenizer or modality.load_processor(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg)
    pad = modality.tokenizer_of(processor).pad_token_id
    train_examples, eval_examples = load_examples(cfg, processor, modality)
    advice = weight_advice(cfg, *label_counts(train_examples))
    if advice and ctx.is_main_process:
        console.print(f"[yellow]warning:[/] {advice}")
    train_items = make_items(train_examples, cfg.seed, cfg.max_length, modality)
    eval_items = make_items(eval_examples, cfg.seed + 1, cfg.max_length, modality) if len(eval_examples) > 1 else []

    model = model if model is not None else modality.load_model(cfg.model_name_or_path, settings=cfg)
    policy = modality.prepare_policy(model, cfg)
    splits = {name: item_sequences(items, cfg.kto_kl, modality)
              for name, items in (("train", train_items), ("eval", eval_items))}
    reference = make_reference(cfg, ctx, policy, ref_model=ref_model, precompute=splits if cfg.precompute_ref else None,
                               pad_token_id=pad, modality=modality)
    trainer = Trainer.from_run(ctx, model=CompletionLogprobs(policy, modality, cfg.logprob_chunk_size),
                               task=KTOTask(cfg, pad, reference, ctx.accelerator, policy, modality),
                               train_examples=train_items, eval_examples=eval_items, unit="examples")
    result = trainer.train()
    model_dir = save_final_model(ctx.accelerator, trainer.unwrapped().model, processor, ctx.run_dir / "model",
                                 cfg.merge_lora)
    return finish_run(ctx, model_dir, result)
