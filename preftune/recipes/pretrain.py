"""Pretraining: next-token prediction on raw text, from a checkpoint or from random weights.

Documents are tokenised (BOS as the tokenizer adds it, EOS appended), concatenated and cut into rows
of ``max_length`` tokens; each document piece keeps its own positions and attention block, and the
loss covers every token but the first of each piece.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import PretrainConfig
from ..data.packing import pack_stream
from ..data.split import report_skipped
from ..data.text import read_documents, tokenize_documents
from ..errors import ConfigError
from ..models import load_causal_lm, load_tokenizer
from ..runtime.run import RunResult, start_run, train_and_eval
from .sft import train_lm


def fresh_model(model_config: str, tokenizer, seed: int):
    """A randomly initialised causal LM shaped by a config.json (or a model directory's config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_config).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read model config '{model_config}': {exc}") from None
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model config's vocab_size is "
                          f"{config.vocab_size}; raise vocab_size in {model_config}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            setattr(config, name, getattr(tokenizer, name))
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise ConfigError(f"cannot build a causal LM from '{model_config}': {exc}") from None


def pretrain_rows(cfg: PretrainConfig, tokenizer):
    """Packed training and held-out rows, and counts for the summary."""

    def documents(source, split):
        texts, report = read_documents(source, split, cfg.text_column, cfg.skip_invalid)
        report_skipped(str(source), report)
        return texts

    train, held = train_and_eval(cfg, documents)
    train_rows = pack_stream(tokenize_documents(train, tokenizer), cfg.max_length)
    eval_rows = pack_stream(tokenize_documents(held, tokenizer), cfg.max_length) if held else []
    return train_rows, eval_rows, {"train_documents": len(train), "eval_documents": len(held)}


def train_pretrain(cfg: PretrainConfig, *, model=None, tokenizer=None) -> RunResult:
    """Pretrain (or continue pretraining); ``model``/``tokenizer`` may be passed as objects."""
    cfg.validate(require_model=model is None)
    if cfg.model_config and cfg.lora and not cfg.merge_lora:
        raise ConfigError("lora on a model_config (random weights) would save only adapters for a base that is "
                          "never saved; train all weights, or add merge_lora")
    ctx = start_run(cfg, cfg.sanity_warnings())
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg)
    train_rows, eval_rows, counts = pretrain_rows(cfg, tokenizer)
    if model is None:
        model = fresh_model(cfg.model_config, tokenizer, cfg.seed) if cfg.model_config \
            else load_causal_lm(cfg.model_name_or_path, settings=cfg)
    return train_lm(cfg, ctx, model, tokenizer, train_rows, eval_rows, packed=True, extra=counts)
