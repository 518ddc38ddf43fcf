"""The reference policy, chosen in one place: a frozen model, the LoRA policy with its adapters
disabled, log-probs precomputed once and cached on disk, or none.

:func:`make_reference` decides, for every algorithm: an explicit ``ref_model`` object, else
``ref_model_name_or_path``, else (with LoRA) the policy's own base weights with adapters off, else a
frozen copy of the policy in the compute precision. Every kind answers the same questions of a
batch of ``(input_ids, attention_mask, completion_mask)`` rows: ``sequence_logps`` (summed over the
completion, ``[B]``) and, when run live, ``token_logps`` (per completion token, flat).

Reference log-probs never change during training, so with ``precompute`` they are computed in one
pass before training, for any list of (prompt ids, completion ids) sequences (DPO's chosen and
rejected, KTO's mismatched completions, ...), and stored under a fingerprint of (reference model,
exact token ids, precision and compute dtype). Any later run with the same fingerprint loads them instead of
running the reference: the token ids capture the data, the tokenizer and every truncation setting at once. The
cache file records its precision and computation too, and a file of another one is refused, never mixed in.

The reference computes as the policy does (:func:`compute_words`): under the run's autocast (bf16 or fp16
matrix products, fp32 master weights, log-softmax and sums in fp32), whether it is the policy itself (LoRA with
adapters off; the policy before its first step, for precomputing) or a frozen copy, whose linear layers are
stored in the compute dtype (:func:`preftune.models.computing_copy`: bitwise the products autocast computes).
So the first DPO loss is exactly ln 2 and the first KTO loss exactly 0.5 in bf16 as in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..losses.weighting import active_ld_alpha, pair_shared_lengths
from ..modality import FLAT, SUMS, TEXT, CompletionLogprobs, Modality
from ..models import (
    base_model,
    compute_dtype,
    computing_copy,
    disable_dropout,
    freeze,
    is_peft_model,
    model_fingerprint,
)
from ..speed import apply as apply_speed
from ..wrappers import evaluating
from .distributed import full_tensor

CACHE_FORMAT = "preftune-ref-logps-v3"   # v3: computed under the run's autocast; precision in the file
Sequence = tuple   # (prompt, completion ids): a prompt as its modality holds one (token ids, or ids with images)
console = Console(stderr=True)


class Reference:
    """No reference (a reference-free loss): asking it for log-probs is a bug."""

    kind = "none"

    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise RuntimeError(f"the reference ({self.kind}) cannot give sequence log-probs here")

    def token_logps(self, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        raise RuntimeError(f"the reference ({self.kind}) cannot give per-token log-probs")


class LiveReference(Reference):
    """A model run on every batch, in eval mode and without gradients, through its modality's forward."""

    def __init__(self, model: torch.nn.Module, chunk_size: int, modality: Modality = TEXT, autocast=None):
        self.model = model
        self.chunk_size = chunk_size
        self.modality = modality
        self.autocast = autocast or contextlib.nullcontext   # the run's autocast: the policy's computation

    def running(self):
        return contextlib.nullcontext()

    def logprobs(self, temperature: float = 1.0) -> CompletionLogprobs:
        """The model as the one log-prob module the policy trains as (the same hidden states and projection)."""
        return CompletionLogprobs(self.model, self.modality, self.chunk_size, temperature)

    @torch.no_grad()
    def sequence_logps(self, batch):
        with self._evaluating():
            return self.logprobs()(batch, SUMS).values

    @torch.no_grad()
    def token_logps(self, batch, temperature: float = 1.0):
        with self._evaluating():
            return self.logprobs(temperature)(batch, FLAT).values

    @contextlib.contextmanager
    def _evaluating(self):
        with evaluating(self.model), self.autocast(), self.running():
            yield


class ModelReference(LiveReference):
    """A separate frozen model."""

    kind = "model"


class AdapterReference(LiveReference):
    """The LoRA policy with its adapters disabled: the base weights, no second copy in memory."""

    kind = "adapter"

    def running(self):
        return self.model.disable_adapter()


class PrecomputedReference(Reference):
    """Sequence log-probs computed before training, looked up by each row's exact tokens (and images)."""

    kind = "precomputed"

    def __init__(self, table: dict[tuple, float], modality: Modality = TEXT):
        self.table = table
        self.modality = modality

    def sequence_logps(self, batch):
        keys = self.modality.batch_keys(batch)
        if "shared_lengths" in batch:   # LD-DPO: a sequence's value depends on its pair's shared length
            keys = list(zip(keys, batch["shared_lengths"].tolist()))
        try:
            values = [self.table[key] for key in keys]
        except KeyError:
            raise RuntimeError("a sequence of this batch has no precomputed reference log-prob") from None
        return torch.tensor(values, dtype=torch.float32, device=batch["input_ids"].device)


@torch.no_grad()
def sync_reference(reference: Reference, policy: torch.nn.Module, alpha: float) -> None:
    """Move a frozen reference towards the policy (TR-DPO, Gorbatovski et al. 2024, as GRPO's ``sync_ref_model``):
    every weight becomes ``alpha x policy + (1 - alpha) x reference``; ``alpha = 1`` copies the policy."""
    if not isinstance(reference, ModelReference):
        raise RuntimeError(f"a {reference.kind} reference cannot be synced (it needs a separate frozen model)")
    source = dict(policy.named_parameters())
    for name, weight in reference.model.named_parameters():
        if name not in source:
            raise RuntimeError(f"cannot sync the reference: the policy has no parameter {name!r}")
        weight.copy_(torch.lerp(weight.float(), full_tensor(source[name].detach()).float(), alpha))  # FSDP2: gathered


def make_reference(cfg, ctx, policy, *, ref_model=None, needed: bool = True,
                   precompute: dict[str, list[Sequence]] | None = None, pad_token_id: int | None = None,
                   modality: Modality = TEXT) -> Reference:
    """The run's reference for ``policy`` (already prepared: LoRA applied), on ``ctx``'s device, run on
    ``modality``'s batches.

    ``precompute`` (split name -> sequences) asks for :class:`PrecomputedReference`: the log-probs of
    those sequences are loaded from the cache or computed now, and no reference model is kept (nor copied:
    the policy, still at its starting weights, computes them when it already runs in the compute dtype).
    """
    if not needed:
        return Reference()
    device, chunk, autocast = ctx.accelerator.device, cfg.logprob_chunk_size, ctx.accelerator.autocast
    if ref_model is None and cfg.ref_model_name_or_path:
        ref_model = computing_copy(modality.load_model(cfg.ref_model_name_or_path, settings=cfg), ctx.precision)
    if ref_model is None and is_peft_model(policy):
        live: LiveReference = AdapterReference(policy.to(device), chunk, modality, autocast)
    elif ref_model is None and precompute is not None:
        live = ModelReference(policy.to(device), chunk, modality, autocast)   # before training the policy is it
    else:
        if ref_model is None:
            ref_model = computing_copy(copy.deepcopy(policy), ctx.precision)
        disable_dropout(ref_model)
        apply_speed(ref_model, cfg)   # the policy's own computation (attention, fused layers, head function)
        live = ModelReference(freeze(ref_model).to(device), chunk, modality, autocast)
    if precompute is None:
        return live
    return _precomputed(cfg, ctx, live, precompute, pad_token_id)


def compute_words(precision: str) -> str:
    """How a run's log-probs are computed, as the cache key and the cache file record it."""
    dtype = str(compute_dtype(precision)).removeprefix("torch.")
    return "float32" if precision == "fp32" else f"{dtype} autocast, float32 weights and log-softmax"


def check_cache_file(path: Path, precision: str, ld_alpha: float | None = None) -> None:
    """Refuse a cached file written in another precision or computation (or by another cache format, or with
    another LD-DPO ``ld_alpha``)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    expected = {"format": CACHE_FORMAT, "precision": precision, "compute": compute_words(precision),
                "ld_alpha": None if ld_alpha is None else repr(float(ld_alpha))}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        found = ", ".join(f"{k} {v!r}" for k, v in wrong.items())
        raise ConfigError(f"{path}: cached reference log-probs of another computation ({found}; this run: precision "
                          f"{precision!r}, compute {compute_words(precision)!r}, ld_alpha {ld_alpha!r}); refusing to "
                          f"use them. Delete the file or choose another --cache_dir")


def cache_metadata(precision: str, sequences: int, ld_alpha: float | None = None) -> dict[str, str]:
    extra = {} if ld_alpha is None else {"ld_alpha": repr(float(ld_alpha))}
    return {"format": CACHE_FORMAT, "sequences": str(sequences), "precision": precision,
            "compute": compute_words(precision), **extra}


def _precomputed(cfg, ctx, live: LiveReference, splits: dict[str, list[Sequence]], pad_token_id: int) -> Reference:
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    fingerprint = model_fingerprint(base_model(live.model), cfg.ref_model_name_or_path or cfg.model_name_or_path)
    table, described = {}, {}
    ld_alpha = active_ld_alpha(getattr(cfg, "ld_alpha", None))
    for split, sequences in splits.items():
        if not sequences:
            continue
        modality = live.modality
        path = cache_root / f"{cache_key(fingerprint, sequences, ctx.precision, modality, ld_alpha)}.safetensors"
        with live.autocast():   # the layout probe runs the model as training will
            layout = modality.pair_collator(cfg, pad_token_id, live.model)
        cached = precompute_logps(live, sequences, pad_token_id, 2 * cfg.per_device_batch_size, path, ctx.accelerator,
                                  layout=layout, precision=ctx.precision)
        keys = [modality.sequence_key(*s) for s in sequences]
        if ld_alpha is not None:   # sequences 2i and 2i + 1 are a pair: the value holds its shared length
            shared = pair_shared_lengths(torch.tensor([len(completion) for _, completion in sequences]), True)
            keys = list(zip(keys, shared.tolist()))
        table.update(zip(keys, cached.logps.tolist()))
        described[split] = {"path": str(cached.path), "reused": cached.hit, "sequences": len(sequences)}
        if ctx.is_main_process:
            state = "reused cached" if cached.hit else "computed and cached"
            console.print(f"reference log-probs ({split}): {state} at {cached.path}")
    if ctx.is_main_process:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        (ctx.run_dir / "reference_cache.json").write_text(json.dumps(described, indent=2))
    return PrecomputedReference(table, live.modality)


def default_cache_dir() -> Path:
    root = os.environ.get("PREFTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "preftune")
    return Path(root) / "reference-logps"


def cache_key(model_fingerprint: str, sequences: list[Sequence], precision: str, modality: Modality = TEXT,
              ld_alpha: float | None = None) -> str:
    """The cache file's name: reference model, exact tokens (and images), precision and compute dtype
    (:func:`compute_words`), and LD-DPO's ``ld_alpha`` when set (the values are then LD-combined)."""
    parts = [CACHE_FORMAT, model_fingerprint, modality.digest(sequences), precision, compute_words(precision)]
    parts += [] if ld_alpha is None else [f"ld_alpha={float(ld_alpha)!r}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@dataclass
class CachedLogps:
    logps: torch.Tensor     # [N], one per sequence
    path: Path
    hit: bool               # True when loaded from an earlier run's cache


def precompute_logps(reference: LiveReference, sequences: list[Sequence], pad_token_id: int, batch_size: int,
                     cache_path: Path, accelerator=None, layout=None, precision: str = "fp32") -> CachedLogps:
    """Reference log-probs of every sequence, loaded from ``cache_path`` or computed and written there.

    ``precision`` is the run's: a cached file of another precision or computation (or LD-DPO ``ld_alpha``: the
    values are LD-combined as ``layout.ld_alpha`` says) is refused (ConfigError).
    ``layout`` (default: padded rows) may pack each batch; with prefix sharing, sequences ``2i`` and
    ``2i + 1`` that share a prompt (a pair's chosen and rejected) share one block."""
    device = accelerator.device if accelerator is not None else "cpu"
    ld_alpha = getattr(layout, "ld_alpha", None)
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        if cache_path.is_file():
            check_cache_file(cache_path, precision, ld_alpha)
            logps = load_file(cache_path)["logps"]
            if logps.numel() == len(sequences):
                return CachedLogps(logps, cache_path, hit=True)
        parts = [reference.modality.reference_logps(reference, sequences[start:start + batch_size], pad_token_id,
                                                    layout, device)
                 for start in range(0, len(sequences), batch_size)]
        logps = torch.cat(parts).contiguous()
        if accelerator is None or accelerator.is_main_process:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            staging = cache_path.with_suffix(".partial")
            save_file({"logps": logps}, staging, metadata=cache_metadata(precision, len(sequences), ld_alpha))
            staging.replace(cache_path)
    return CachedLogps(logps, cache_path, hit=False)
