"""Loading tokenizers, policies and reference models: precision by hardware, LoRA through peft."""

from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConfigError
from .gguf_import import resolve_model_path
from .speed import apply as apply_speed
from .wrappers import base_model, disable_dropout, is_peft_model

__all__ = ["base_model", "disable_dropout", "is_peft_model"]   # re-exported: callers load and unwrap from here

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on a GPU that supports it, else 'fp32' (bf16 matmuls are ~150x slower on CPU)."""
    if precision != "auto":
        if precision in ("bf16", "fp16") and not torch.cuda.is_available():
            raise ConfigError(f"precision={precision} needs a GPU; on CPU use fp32 (or auto)")
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    name_or_path = resolve_model_path(name_or_path)   # a .gguf file: its converted checkpoint
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer '{name_or_path}': {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer '{name_or_path}' has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    name_or_path = resolve_model_path(name_or_path)   # a .gguf file: its converted checkpoint
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model '{name_or_path}': {exc}") from None


@contextmanager
def peft_wrapping():
    """Around peft's model wrapping: silence the one FutureWarning it triggers on every LoRA model.

    peft 0.21 (the newest) reads ``model.is_gradient_checkpointing`` in every ``PeftModel`` constructor,
    a property transformers 5 deprecates with a FutureWarning in favour of ``is_activation_checkpointing``;
    no call of ours avoids the constructor and the user can do nothing about it. Only that message is
    silenced, only here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_any_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """A full checkpoint, or a peft adapter directory loaded onto its base model (for evaluation, sampling)."""
    if (Path(name_or_path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        try:
            with peft_wrapping():
                return AutoPeftModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load adapter '{name_or_path}': {exc}") from None
    return load_causal_lm(name_or_path, dtype)


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str], task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules in (["all-linear"], "all-linear") else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type,
                        modules_to_save=modules_to_save)
    try:
        with peft_wrapping():
            return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"LoRA: {exc}") from None


def prepare_policy(model, cfg, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None,
                   target_modules: list[str] | None = None, frozen: tuple = ()):
    """Dropout, frozen parts, gradient checkpointing, LoRA and the speed mechanisms on a loaded model, per the
    settings.

    ``task_type``/``modules_to_save`` are peft's: a reward model passes ``SEQ_CLS`` and its head, which is
    then trained in full next to the adapters. ``target_modules`` (default: the config's) and ``frozen``
    (modules or weights that never train) let a modality say which parts learn: a vision-language model
    freezes its vision tower and puts adapters on its language model only."""
    if cfg.disable_dropout:
        disable_dropout(model)
    for part in frozen:
        part.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora:
        targets = cfg.lora_target_modules if target_modules is None else target_modules
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, task_type, modules_to_save)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    apply_speed(model, cfg)
    return model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, by the name transformers 5 keeps (the old one warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def model_fingerprint(model, name_or_path: str | None) -> str:
    """A stable identity for cached reference log-probs.

    A local checkpoint is identified by its config and its weight files (names, sizes, modification
    times); a model built in memory by a hash of its parameters.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    path = Path(name_or_path) if name_or_path else None
    if path is not None and path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix in WEIGHT_SUFFIXES:
                stat = file.stat()
                digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    elif name_or_path and path is not None and not path.exists():
        digest.update(f"hub:{name_or_path}:{getattr(model.config, '_commit_hash', '')}".encode())
    else:
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
