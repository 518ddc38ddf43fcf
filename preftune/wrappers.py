"""Seeing through what wraps a model, and the small mode rules every caller shares.

A policy may be a transformers model, a peft ``PeftModel`` around one, or either wrapped by a distributed
launcher. Whether a model is a peft model, the transformers model under it, dropout off, and eval mode for a
block with the caller's mode restored: each rule is written here once.
"""

from __future__ import annotations

import contextlib

from torch import nn


def is_peft_model(model) -> bool:
    """A peft model (adapters that can be switched off), by the interface the callers use."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def base_model(model):
    """The transformers model under a peft wrapper (its adapter layers stay injected), or ``model`` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def disable_dropout(model: nn.Module, keep_lora_dropout: bool = True) -> None:
    """Zero every dropout (and attention dropout); LoRA's own is kept unless ``keep_lora_dropout`` is False
    (its rate is a training choice; rollouts and updates that must evaluate one function turn it off too)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and not (keep_lora_dropout and "lora_dropout" in name):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode for the block, its own mode restored after (also on an error)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
