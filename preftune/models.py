"""Loading tokenizers, policies and reference models: precision by hardware, LoRA through peft."""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .gguf_import import resolve_model_path
from .speed import apply as apply_speed
from .wrappers import base_model, disable_dropout, is_peft_model

__all__ = ["base_model", "disable_dropout", "is_peft_model"]   # re-exported: callers load and unwrap from here

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU offers for bf16 matrix products, detected once (:func:`cpu_bf16`)."""

    amx: bool            # AMX-BF16 tiles (Intel Sapphire Rapids and later)
    avx512_bf16: bool    # AVX512-BF16 dot products (Intel Cooper Lake+, AMD Zen 4+)
    capability: str      # torch.backends.cpu.get_cpu_capability()
    forced: bool | None = None  # CPU_BF16_OVERRIDE, when a caller pinned the answer

    @property
    def fast(self) -> bool:
        if self.forced is not None:
            return self.forced
        return self.amx or self.avx512_bf16

    def words(self) -> str:
        found = [name for name, on in (("AMX-BF16", self.amx), ("AVX512-BF16", self.avx512_bf16)) if on]
        text = (" and ".join(found) if found else "neither AMX-BF16 nor AVX512-BF16") + f" (torch: {self.capability})"
        if self.forced is not None:
            text += f"; pinned to {'fast' if self.forced else 'slow'} bf16 by the caller (CPU_BF16_OVERRIDE)"
        return text

    def as_dict(self) -> dict:
        return {"amx_bf16": self.amx, "avx512_bf16": self.avx512_bf16, "capability": self.capability,
                "fast_bf16": self.fast, **({"forced": self.forced} if self.forced is not None else {})}


@functools.lru_cache(maxsize=1)
def _detected_cpu() -> tuple[bool, bool, str]:
    """``(AMX-BF16, AVX512-BF16, capability)``: from torch's own CPU feature checks (cpuinfo), else the flags of
    ``/proc/cpuinfo``."""
    capability = str(torch.backends.cpu.get_cpu_capability())
    amx = avx = None
    try:
        amx, avx = bool(torch.cpu._is_amx_tile_supported()), bool(torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    if amx is None or avx is None:
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        amx, avx = "amx_bf16" in flags, "avx512_bf16" in flags
    if "AMX" in capability.upper():
        amx = True
    return amx, avx, capability


CPU_BF16_OVERRIDE: bool | None = None   # a caller may pin the answer (the tests pin False); None: detect


def cpu_bf16() -> CpuBf16:
    """This CPU's bf16 support, detected once, unless a caller pinned it (``CPU_BF16_OVERRIDE``)."""
    amx, avx, capability = _detected_cpu()
    return CpuBf16(amx, avx, capability, CPU_BF16_OVERRIDE)


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run computes in, and why (recorded in ``config.json`` and ``summary.json``)."""

    requested: str          # auto, fp32, bf16 or fp16
    precision: str          # fp32, bf16 or fp16
    reason: str
    note: str | None = None  # a warning for the user (explicit bf16 on a CPU that emulates it)

    def as_dict(self) -> dict:
        mode = "fp32" if self.precision == "fp32" else f"{self.precision} autocast, fp32 master weights"
        return {"requested": self.requested, "precision": self.precision, "compute": mode, "reason": self.reason,
                **({"note": self.note} if self.note else {})}


def choose_precision(precision: str) -> PrecisionChoice:
    """The run's precision for ``precision`` (auto, fp32, bf16 or fp16) on this machine, with the reason.

    ``auto``: bf16 on a GPU that supports it and on a CPU with fast bf16 products (AMX-BF16 or AVX512-BF16),
    fp32 elsewhere. An explicit ``bf16`` runs on any CPU (emulated, hence slow, without those units: a note
    says so); ``fp16`` needs a GPU. bf16 and fp16 are mixed precision: fp32 master weights and optimiser state,
    matrix products under autocast, softmax, log-probs and losses in fp32."""
    gpu = torch.cuda.is_available()
    if precision == "fp32":
        return PrecisionChoice(precision, "fp32", "asked for")
    if precision == "fp16":
        if not gpu:
            raise ConfigError("precision=fp16 needs a GPU (CPU autocast has no fp16 path); on CPU use bf16, fp32 "
                              "or auto")
        return PrecisionChoice(precision, "fp16", "asked for (GPU)")
    if gpu:
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice(precision, "bf16", f"{'asked for; ' if precision == 'bf16' else ''}GPU {name} "
                                                      f"supports bf16")
        if precision == "bf16":
            raise ConfigError(f"precision=bf16: the GPU {name} does not support bf16; use fp16, fp32 or auto")
        return PrecisionChoice(precision, "fp32", f"GPU {name} has no bf16")
    cpu = cpu_bf16()
    if precision == "bf16":
        note = None if cpu.fast else (f"bf16 on a CPU without fast bf16 products ({cpu.words()}) is emulated, "
                                      f"usually slower than fp32; precision auto would choose fp32 here")
        return PrecisionChoice(precision, "bf16", f"asked for; CPU {'with' if cpu.fast else 'without'} fast bf16 "
                                                  f"products: {cpu.words()}", note)
    if cpu.fast:
        return PrecisionChoice(precision, "bf16", f"CPU with fast bf16 products: {cpu.words()}")
    return PrecisionChoice(precision, "fp32", f"CPU without fast bf16 products (bf16 would be emulated): "
                                              f"{cpu.words()}")


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' where the hardware has fast bf16 products, else 'fp32' (see :func:`choose_precision`)."""
    return choose_precision(precision).precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the matrix products (autocast's) for a resolved precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def computing_copy(model: nn.Module, precision: str) -> nn.Module:
    """``model`` (a frozen copy: a reference) stored as the policy computes: under ``precision``'s autocast every
    ``nn.Linear`` runs on its weights cast to the compute dtype, so those are stored cast (half the memory) and
    give bitwise the same products; norms, embeddings and everything else stay as they are (autocast runs them
    on the stored weights). In place; returns ``model``."""
    dtype = compute_dtype(precision)
    if dtype == torch.float32:
        return model
    tied = {id(p) for name in ("get_input_embeddings",) for m in [getattr(model, name, lambda: None)()]
            if isinstance(m, nn.Module) for p in m.parameters()}
    for module in model.modules():
        if isinstance(module, nn.Linear) and not any(id(p) in tied for p in module.parameters(recurse=False)):
            for name, param in list(module.named_parameters(recurse=False)):
                if param.dtype == torch.float32:
                    param.data = param.data.to(dtype)
    return model


def from_pretrained_options(settings, name_or_path: str | None, weights: bool = True) -> dict:
    """The keyword arguments of ``from_pretrained`` that a command's model settings (:class:`ModelSettings`, or
    None: none) ask for when loading ``name_or_path``: ``trust_remote_code``; ``revision`` for
    ``model_name_or_path`` only; for weights (``weights``; else a tokenizer or processor) ``attn_implementation``
    and the bitsandbytes quantization with the device map that puts the model on this process's GPU."""
    if settings is None:
        return {}
    options: dict = {}
    if settings.trust_remote_code:
        options["trust_remote_code"] = True
    if settings.revision and name_or_path == settings.model_name_or_path:
        options["revision"] = settings.revision
    if weights:
        if settings.attn_implementation:
            options["attn_implementation"] = settings.attn_implementation
        quantization = quantization_config(settings)
        if quantization is not None:
            from accelerate import PartialState

            options["quantization_config"] = quantization
            options["device_map"] = {"": PartialState().local_process_index}   # quantized where it is loaded
    return options


def quantization_config(settings):
    """bitsandbytes' ``BitsAndBytesConfig`` for ``load_in_4bit``/``load_in_8bit`` (None without either); a
    ConfigError where bitsandbytes is missing or there is no CUDA GPU to run it on."""
    bits = 4 if settings.load_in_4bit else 8 if settings.load_in_8bit else None
    if bits is None:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"load_in_{bits}bit needs bitsandbytes: pip install 'preftune[quantization]' "
                          "(or pip install bitsandbytes)")
    if not torch.cuda.is_available():
        raise ConfigError(f"load_in_{bits}bit needs a CUDA GPU (bitsandbytes' quantized training kernels); on this "
                          "machine load the model in full precision")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=settings.use_bnb_nested_quant,
                              bnb_4bit_compute_dtype=compute_dtype(resolve_precision(settings.precision)),
                              bnb_4bit_quant_storage=torch.uint8)


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def load_tokenizer(name_or_path: str, settings=None):
    """A checkpoint's tokenizer (pad token: EOS where it has none), with the ``settings``' loading options."""
    from transformers import AutoTokenizer

    options = from_pretrained_options(settings, name_or_path, weights=False)
    name_or_path = resolve_model_path(name_or_path)   # a .gguf file: its converted checkpoint
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **options)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer '{name_or_path}': {exc}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer '{name_or_path}' has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, settings=None):
    """A causal LM checkpoint, with the loading options of ``settings`` (see :func:`from_pretrained_options`)."""
    from transformers import AutoModelForCausalLM

    options = from_pretrained_options(settings, name_or_path)
    resolved = resolve_model_path(name_or_path)   # a .gguf file: its converted checkpoint
    try:
        return named_as_given(AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, **options), name_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model '{resolved}': {exc}") from None


def named_as_given(model, name_or_path):
    """``model`` named by the path it was asked for: a GGUF file's model is loaded from its converted checkpoint in
    the cache, but a LoRA adapter trained on it records the .gguf file as its base (preftune loads it back from
    there), not the cache directory."""
    if resolve_model_path(name_or_path) != str(name_or_path):
        model.name_or_path = model.config.name_or_path = str(name_or_path)   # peft reads the model's attribute
    return model


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


def load_any_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, settings=None):
    """A full checkpoint, or a peft adapter directory loaded onto its base model (for evaluation, sampling)."""
    adapter = Path(name_or_path) / "adapter_config.json"
    if adapter.is_file():
        from peft import AutoPeftModelForCausalLM, PeftModel

        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        try:
            with peft_wrapping():
                if base and resolve_model_path(base) != base:   # trained on a .gguf file: its converted checkpoint
                    return PeftModel.from_pretrained(load_causal_lm(base, dtype, settings), name_or_path)
                return AutoPeftModelForCausalLM.from_pretrained(name_or_path, dtype=dtype,
                                                                **from_pretrained_options(settings, name_or_path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load adapter '{name_or_path}': {exc}") from None
    return load_causal_lm(name_or_path, dtype, settings)


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
        if is_quantized(model):   # norms and unquantized weights in fp32, every base weight frozen (QLoRA)
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
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
