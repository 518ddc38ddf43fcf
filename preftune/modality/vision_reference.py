"""The reference of a vision-language policy: live (frozen copy, or the LoRA policy with adapters off)
or precomputed once and cached on disk.

:func:`preftune.runtime.reference.make_reference` chooses the live model exactly as for text; here it is
run on vision batches (images encoded once per pair). With ``precompute_ref`` every pair's two
sequence log-probs are computed before training and stored under a key of (reference model, exact
token ids, image bytes, precision and compute dtype), so a second run over the same data and images loads them, and
changing one pixel of one image computes them afresh.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from ..models import base_model, model_fingerprint
from ..multimodal.data import VisionPair, collate_vision_pairs
from ..multimodal.logprobs import vision_token_logprobs
from ..runtime.reference import (
    CACHE_FORMAT,
    LiveReference,
    Reference,
    cache_metadata,
    check_cache_file,
    compute_words,
    default_cache_dir,
    row_keys,
    token_fingerprint,
)

console = Console(stderr=True)


class VisionLiveReference(Reference):
    """A live reference (frozen model or disabled adapters) run on vision batches."""

    def __init__(self, live: LiveReference):
        self.live = live
        self.kind = live.kind

    @torch.no_grad()
    def sequence_logps(self, batch):
        with self.live._evaluating():
            return vision_token_logprobs(self.live.model, batch, self.live.chunk_size).sum(-1)


class VisionPrecomputedReference(Reference):
    """Sequence log-probs computed before training, looked up by each row's tokens and image digest."""

    kind = "precomputed"

    def __init__(self, table: dict[tuple, float]):
        self.table = table

    def sequence_logps(self, batch):
        keys = zip(row_keys(batch), batch["image_keys"].tolist())
        try:
            values = [self.table[key] for key in keys]
        except KeyError:
            raise RuntimeError("a sequence of this batch has no precomputed reference log-prob") from None
        return torch.tensor(values, dtype=torch.float32, device=batch["input_ids"].device)


def pair_keys(pair: VisionPair) -> list[tuple]:
    """The lookup keys of a pair's chosen and rejected rows (as :func:`row_keys` reads them from a batch)."""
    return [((tuple(pair.prompt.ids + ids), len(ids)), pair.prompt.image_key)
            for ids in (pair.chosen_ids, pair.rejected_ids)]


def vision_cache_key(fingerprint: str, pairs: list[VisionPair], precision: str) -> str:
    images = hashlib.sha256(b"".join(p.prompt.image_key.to_bytes(8, "little") for p in pairs)).hexdigest()
    sequences = [(p.prompt.ids, ids) for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    parts = [CACHE_FORMAT, "vision", fingerprint, token_fingerprint(sequences), images, precision,
             compute_words(precision)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def precompute_vision_reference(cfg, ctx, live: LiveReference, splits: dict[str, list[VisionPair]],
                                pad_token_id: int) -> VisionPrecomputedReference:
    """Load every split's reference log-probs from the cache, or compute and cache them."""
    reference = VisionLiveReference(live)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    fingerprint = model_fingerprint(base_model(live.model), cfg.ref_model_name_or_path or cfg.model_name_or_path)
    table, described = {}, {}
    for split, pairs in splits.items():
        if not pairs:
            continue
        path = cache_root / f"{vision_cache_key(fingerprint, pairs, ctx.precision)}.safetensors"
        if path.is_file():
            check_cache_file(path, ctx.precision)
        hit = path.is_file() and load_file(path)["logps"].numel() == 2 * len(pairs)
        logps = load_file(path)["logps"] if hit else _compute(reference, pairs, pad_token_id,
                                                               cfg.per_device_batch_size, ctx, path)
        for pair, values in zip(pairs, logps.view(-1, 2).tolist()):
            table.update(zip(pair_keys(pair), values))
        described[split] = {"path": str(path), "reused": hit, "sequences": 2 * len(pairs)}
        if ctx.is_main_process:
            console.print(f"reference log-probs ({split}): {'reused cached' if hit else 'computed and cached'} "
                          f"at {path}")
    if ctx.is_main_process:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        (ctx.run_dir / "reference_cache.json").write_text(json.dumps(described, indent=2))
    return VisionPrecomputedReference(table)


def _compute(reference: VisionLiveReference, pairs: list[VisionPair], pad_token_id: int, batch_size: int, ctx,
             path: Path) -> torch.Tensor:
    """``[2 x pairs]`` log-probs, each pair's (chosen, rejected) together; written to ``path``."""
    device, parts = ctx.accelerator.device, []
    for start in range(0, len(pairs), batch_size):
        batch = collate_vision_pairs(pairs[start:start + batch_size], pad_token_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        chosen, rejected = reference.sequence_logps(batch).cpu().chunk(2)
        parts.append(torch.stack([chosen, rejected], dim=1).flatten())
    logps = torch.cat(parts).contiguous()
    if ctx.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".partial")
        save_file({"logps": logps}, staging, metadata=cache_metadata(ctx.precision, logps.numel()))
        staging.replace(path)
    return logps
