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
exact token ids, precision). Any later run with the same fingerprint loads them instead of running
the reference: the token ids capture the data, the tokenizer and every truncation setting at once.
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

from ..logprobs import completion_logprobs
from ..modality import TEXT, Modality
from ..models import base_model, compute_dtype, disable_dropout, freeze, is_peft_model, model_fingerprint
from ..speed import apply as apply_speed
from ..wrappers import evaluating
from .distributed import full_tensor

CACHE_FORMAT = "preftune-ref-logps-v2"
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

    def __init__(self, model: torch.nn.Module, chunk_size: int, modality: Modality = TEXT):
        self.model = model
        self.chunk_size = chunk_size
        self.modality = modality

    def running(self):
        return contextlib.nullcontext()

    @torch.no_grad()
    def sequence_logps(self, batch):
        with self._evaluating():
            return self.modality.sequence_logps(self.model, batch, self.chunk_size)

    @torch.no_grad()
    def token_logps(self, batch, temperature: float = 1.0):
        with self._evaluating():
            hidden = self.modality.hidden_states(self.model, batch)
            logps, _ = completion_logprobs(self.model, hidden, batch["input_ids"], batch["completion_mask"],
                                           chunk_size=self.chunk_size, temperature=temperature)
        return logps

    @contextlib.contextmanager
    def _evaluating(self):
        with evaluating(self.model), self.running():
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
    device, chunk = ctx.accelerator.device, cfg.logprob_chunk_size
    if ref_model is None and cfg.ref_model_name_or_path:
        ref_model = modality.load_model(cfg.ref_model_name_or_path, compute_dtype(ctx.precision))
    if ref_model is None and is_peft_model(policy):
        live: LiveReference = AdapterReference(policy.to(device), chunk, modality)
    elif ref_model is None and precompute is not None and _in_dtype(policy, compute_dtype(ctx.precision)):
        live = ModelReference(policy.to(device), chunk, modality)   # before training the policy is the reference
    else:
        if ref_model is None:
            ref_model = copy.deepcopy(policy).to(compute_dtype(ctx.precision))
        disable_dropout(ref_model)
        apply_speed(ref_model, cfg)   # the policy's own computation (attention, fused layers, head function)
        live = ModelReference(freeze(ref_model).to(device), chunk, modality)
    if precompute is None:
        return live
    return _precomputed(cfg, ctx, live, precompute, pad_token_id)


def _in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    return all(p.dtype == dtype for p in model.parameters() if p.is_floating_point())


def _precomputed(cfg, ctx, live: LiveReference, splits: dict[str, list[Sequence]], pad_token_id: int) -> Reference:
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    fingerprint = model_fingerprint(base_model(live.model), cfg.ref_model_name_or_path or cfg.model_name_or_path)
    table, described = {}, {}
    for split, sequences in splits.items():
        if not sequences:
            continue
        modality = live.modality
        path = cache_root / f"{cache_key(fingerprint, sequences, ctx.precision, modality)}.safetensors"
        cached = precompute_logps(live, sequences, pad_token_id, 2 * cfg.per_device_batch_size, path, ctx.accelerator,
                                  layout=modality.pair_collator(cfg, pad_token_id, live.model))
        table.update(zip((modality.sequence_key(*s) for s in sequences), cached.logps.tolist()))
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


def cache_key(model_fingerprint: str, sequences: list[Sequence], precision: str, modality: Modality = TEXT) -> str:
    parts = [CACHE_FORMAT, model_fingerprint, modality.digest(sequences), precision]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@dataclass
class CachedLogps:
    logps: torch.Tensor     # [N], one per sequence
    path: Path
    hit: bool               # True when loaded from an earlier run's cache


def precompute_logps(reference: LiveReference, sequences: list[Sequence], pad_token_id: int, batch_size: int,
                     cache_path: Path, accelerator=None, layout=None) -> CachedLogps:
    """Reference log-probs of every sequence, loaded from ``cache_path`` or computed and written there.

    ``layout`` (default: padded rows) may pack each batch; with prefix sharing, sequences ``2i`` and
    ``2i + 1`` that share a prompt (a pair's chosen and rejected) share one block."""
    device = accelerator.device if accelerator is not None else "cpu"
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        if cache_path.is_file():
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
            save_file({"logps": logps}, staging, metadata={"format": CACHE_FORMAT, "sequences": str(len(sequences))})
            staging.replace(cache_path)
    return CachedLogps(logps, cache_path, hit=False)
