"""Supervised fine-tuning on the shared loop, and the language-modelling task it shares with pretraining.

The loss is the mean negative log-likelihood of the labelled tokens of a batch (completion tokens, or
all of them), computed by :class:`preftune.modality.logprobs.CompletionLogprobs`: only labelled positions reach
the vocabulary projection, chunk by chunk. Packed rows get position ids restarting at 0 for every
example and attention that stays inside each example (:func:`preftune.speed.attention.packed_lm_inputs`:
SDPA block by block, else a block-diagonal causal mask), so examples never see each other; a short
probe checks that the model honours it before training starts. With ``padding_free`` (the default)
a batch's rows are joined into one row the same way, so no padding is computed either. Prompts with
images are read, collated and run by their modality (:func:`preftune.modality.modality_for`), never packed.
"""

from __future__ import annotations

import math

import torch
from rich.console import Console

from ..config import SFTConfig
from ..data.packing import LMRow
from ..errors import ConfigError
from ..modality import TEXT, TOKENS, CompletionLogprobs, Modality, modality_for
from ..runtime.loop import Trainer
from ..runtime.run import (
    RunContext,
    RunResult,
    finish_run,
    save_final_model,
    start_run,
    tokenized_reader,
    train_and_eval,
)
from ..speed.attention import attention_implementation
from ..wrappers import evaluating

console = Console(stderr=True)


@torch.no_grad()
def check_packed_attention(lm: CompletionLogprobs) -> None:
    """Raise ConfigError unless packing two sequences leaves the second one's log-probs unchanged."""
    param = next(lm.parameters())
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(vocab, (n,), generator=generator) for n in (5, 5, 6))
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None].to(param.device)
    mask = torch.ones(1, 11, dtype=torch.bool, device=param.device)
    with evaluating(lm):
        alone = lm({"input_ids": second[None].to(param.device), "attention_mask": mask[:, :6].long(),
                    lm.mask: mask[:, :6]}, TOKENS).values[0]
        packed = [lm({"input_ids": torch.cat([a, second])[None].to(param.device), "attention_mask": mask.long(),
                      lm.mask: mask, "position_ids": positions}, TOKENS).values[0, 5:] for a in (first, other)]
    alone[0] = packed[0][0] = packed[1][0] = 0.0  # first tokens are not scored in a packed row
    tolerance = 1e-4 if param.dtype == torch.float32 else 5e-2
    worst = max(float((p - alone).abs().max()) for p in packed)
    if worst > tolerance:
        raise ConfigError(
            f"packing is not supported by this model ({attention_implementation(lm.model)} attention): a sequence "
            f"packed after another gets different log-probs (by {worst:.3g}) than alone, so packed examples would "
            "attend to each other; train without packing (SFT: packing false) or use another attention implementation")


class LMTask:
    """Next-token NLL over a batch's labelled tokens (SFT and pretraining)."""

    def __init__(self, pad_token_id: int, packed: bool, padding_free: bool = False, modality: Modality = TEXT):
        self.pad_token_id = pad_token_id
        self.packed = packed
        self.padding_free = padding_free
        self.modality = modality

    def collate(self, rows: list[LMRow]) -> dict[str, torch.Tensor]:
        """Padded rows (one example each, or packed ones), or with ``padding_free`` all of them in one row."""
        return self.modality.collate_lm(rows, self.pad_token_id, self.packed, self.padding_free)

    def nll(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: summed NLL of the labelled tokens, and how many there are (``model``: a
        :class:`~preftune.modality.logprobs.CompletionLogprobs` that scores the ``loss_mask``)."""
        return -model(batch, TOKENS).values.sum(-1), batch["loss_mask"][:, 1:].sum(-1).float()

    def loss(self, model, batch):
        nll, count = self.nll(model, batch)
        loss = nll.sum() / count.sum().clamp(min=1)
        return loss, {"loss": loss.detach()}

    def eval_metrics(self, model, batch):
        nll, count = self.nll(model, batch)
        return {"nll": nll, "label_tokens": count}  # per row: the loop hands them to eval_summary

    def eval_summary(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Held-out loss: the mean NLL over every labelled token (not a mean of batch means), and its perplexity."""
        nll = sum(float(o["nll"].sum()) for o in outputs)
        count = sum(float(o["label_tokens"].sum()) for o in outputs)
        loss = nll / max(count, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def check_positions(model, rows: list[LMRow], max_length: int) -> None:
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max((len(r.input_ids) for r in rows), default=0)
    if limit and longest > limit:
        raise ConfigError(f"rows of up to {longest} tokens (max_length {max_length}) exceed the model's "
                          f"{limit} positions; lower max_length")


def train_lm(cfg, ctx: RunContext, model, tokenizer, train_rows: list[LMRow], eval_rows: list[LMRow],
             packed: bool, extra: dict | None = None, modality: Modality = TEXT) -> RunResult:
    """Train ``model`` on language-modelling rows with the shared loop and save it (SFT and pretraining).
    ``tokenizer``: the tokenizer or processor saved with the model."""
    check_positions(model, train_rows + eval_rows, cfg.max_length)
    if ctx.is_main_process:
        tokens = sum(len(r.input_ids) for r in train_rows)
        console.print(f"training on {len(train_rows)} rows ({tokens} tokens), evaluating on {len(eval_rows)} rows")
    lm = CompletionLogprobs(modality.prepare_policy(model, cfg), modality, cfg.logprob_chunk_size,
                            mask="loss_mask").to(ctx.accelerator.device)
    packed, padding_free = packed and modality.packs, getattr(cfg, "padding_free", False) and modality.packs
    if packed or padding_free:
        check_packed_attention(lm)
    task = LMTask(modality.tokenizer_of(tokenizer).pad_token_id, packed, padding_free, modality)
    trainer = Trainer.from_run(ctx, model=lm, task=task, train_examples=train_rows,
                               eval_examples=eval_rows, unit="samples")
    result = trainer.train()
    model_dir = save_final_model(ctx.accelerator, trainer.unwrapped().model, tokenizer, ctx.run_dir / "model",
                                 cfg.merge_lora)
    return finish_run(ctx, model_dir, result, extra)


def train_sft(cfg: SFTConfig, *, model=None, tokenizer=None) -> RunResult:
    """Supervised fine-tuning; ``model``/``tokenizer`` may be passed as objects (with images: a vision-language
    model and its processor)."""
    cfg.validate(require_model=model is None)
    modality = modality_for(cfg)
    ctx = start_run(cfg, cfg.sanity_warnings())
    processor = tokenizer or modality.load_processor(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg)
    train, held = train_and_eval(cfg, tokenized_reader(cfg, processor, modality.sft_tokenizer(cfg)))
    counts = {"train_examples": len(train), "eval_examples": len(held)}
    model = model if model is not None else modality.load_model(cfg.model_name_or_path, settings=cfg)
    return train_lm(cfg, ctx, model, processor, modality.lm_rows(train, cfg), modality.lm_rows(held, cfg),
                    cfg.packing, counts, modality)
