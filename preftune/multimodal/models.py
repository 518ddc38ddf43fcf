"""Loading vision-language models and their processors; which parts train.

A vision-language model has three parts: the vision tower (or audio tower), the projector that maps
its features into the language model's embedding space, and the language model. By default only
the language model learns: ``freeze_vision_tower`` (on) keeps the tower's weights fixed,
``adapt_projector`` (off) lets the projector train too; with ``lora``, adapters go on the language
model's linear layers only and a trained projector is saved in full beside them. The policy itself is
prepared by :func:`preftune.models.prepare_policy`, as a text policy is (every speed switch included);
:func:`trainable_parts` only tells it which parts learn.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

TOWERS = ("vision_tower", "vision_model", "visual", "audio_tower")
PROJECTORS = ("multi_modal_projector", "connector", "merger")
LANGUAGE_MODELS = ("language_model", "text_model")


def load_processor(name_or_path: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the processor of '{name_or_path}': {exc}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise ConfigError(f"'{name_or_path}' has no image processor and tokenizer; data with images needs a "
                          "vision-language model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_vision_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load '{name_or_path}' as a vision-language model: {exc}") from None


def named_part(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """Every submodule whose own name is one of ``names`` (outermost only)."""
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    return found


def language_linear_layers(model: nn.Module) -> list[str]:
    """Full names of the language model's linear layers: the LoRA targets."""
    names = []
    for prefix, part in named_part(model, LANGUAGE_MODELS):
        names += [f"{prefix}.{name}" for name, module in part.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__}: no language model found (looked for "
                          f"{', '.join(LANGUAGE_MODELS)}) to put LoRA adapters on")
    return names


def trainable_parts(model: nn.Module, cfg) -> dict:
    """What :func:`preftune.models.prepare_policy` needs to know of a vision-language model: the parts that stay
    frozen (the tower with ``freeze_vision_tower``, the projector without ``adapt_projector``), the LoRA targets
    (the language model's linear layers, filtered by ``lora_target_modules``) and, with LoRA, the projector saved in
    full when it trains."""
    projectors = named_part(model, PROJECTORS)
    projector_weights = {id(p) for _, module in projectors for p in module.parameters()}
    frozen = [p for _, module in named_part(model, TOWERS) if cfg.freeze_vision_tower for p in module.parameters()
              if not (cfg.adapt_projector and id(p) in projector_weights)]   # Qwen2-VL's merger sits in its tower
    if not cfg.adapt_projector:
        frozen += [p for _, module in projectors for p in module.parameters()]
    parts = {"frozen": tuple(frozen)}
    if cfg.lora:
        targets = language_linear_layers(model)
        if cfg.lora_target_modules not in (["all-linear"], "all-linear"):
            targets = [t for t in targets if t.rsplit(".", 1)[-1] in cfg.lora_target_modules]
        parts["target_modules"] = targets
        parts["modules_to_save"] = [name for name, _ in projectors] if cfg.adapt_projector else None
    return parts
