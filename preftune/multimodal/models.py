"""Loading vision-language models and their processors; which parts train.

A vision-language model has three parts: the vision tower (or audio tower), the projector that maps
its features into the language model's embedding space, and the language model. By default only
the language model learns: ``freeze_vision_tower`` (on) keeps the tower's weights fixed,
``adapt_projector`` (off) lets the projector train too; with ``lora``, adapters go on the language
model's linear layers only and a trained projector is saved in full beside them.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..models import apply_lora, disable_dropout

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


def load_vision_model(name_or_path: str):
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(name_or_path)
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


def prepare_vision_policy(model: nn.Module, cfg) -> nn.Module:
    """Dropout, frozen tower, trainable projector or not, gradient checkpointing and LoRA, per the settings."""
    if cfg.disable_dropout:
        disable_dropout(model)
    projectors = [name for name, _ in named_part(model, PROJECTORS)]
    for name, module in named_part(model, TOWERS):
        if cfg.freeze_vision_tower:
            module.requires_grad_(False)
    for name, module in named_part(model, PROJECTORS):
        module.requires_grad_(cfg.adapt_projector)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora:
        return model
    targets = language_linear_layers(model)
    if cfg.lora_target_modules not in (["all-linear"], "all-linear"):
        targets = [t for t in targets if t.rsplit(".", 1)[-1] in cfg.lora_target_modules]
    model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets,
                       modules_to_save=projectors if cfg.adapt_projector else None)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model
