"""The frozen reference policy: live, adapter-disabled, or precomputed once and cached on disk.

Reference log-probs never change during training, so with ``precompute_ref`` they are computed in
one pass before training and stored under a fingerprint of (reference model, exact token ids,
precision). Any later run with the same fingerprint loads them instead of running the reference:
the token ids capture the data, the tokenizer and every truncation setting at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..logprobs import sequence_logprobs

CACHE_FORMAT = "preftune-ref-logps-v1"


@dataclass
class Reference:
    """How to get reference log-probs for a batch: a frozen model, or the policy with adapters off."""

    model: torch.nn.Module | None = None          # a separate frozen model
    adapter_policy: torch.nn.Module | None = None  # a peft policy whose adapters are disabled for the reference
    chunk_size: int = 1024

    @torch.no_grad()
    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.model is not None:
            context, model = contextlib.nullcontext(), self.model
        elif self.adapter_policy is not None:
            context, model = self.adapter_policy.disable_adapter(), self.adapter_policy
        else:
            raise RuntimeError("no reference model configured")
        was_training = model.training
        model.eval()
        with context:
            sums, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                        chunk_size=self.chunk_size)
        model.train(was_training)
        return sums.float()


def default_cache_dir() -> Path:
    root = os.environ.get("PREFTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "preftune")
    return Path(root) / "reference-logps"


def token_fingerprint(pairs) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def cache_key(model_fingerprint: str, pairs, precision: str) -> str:
    parts = [CACHE_FORMAT, model_fingerprint, token_fingerprint(pairs), precision]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@dataclass
class CachedLogps:
    chosen: torch.Tensor    # [N]
    rejected: torch.Tensor  # [N]
    path: Path
    hit: bool               # True when loaded from an earlier run's cache


def precompute_reference(reference: Reference, pairs, collate, batch_size: int, device, cache_path: Path,
                         accelerator=None) -> CachedLogps:
    """Reference log-probs of every pair, loaded from ``cache_path`` or computed and written there."""
    ctx = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with ctx:
        if cache_path.is_file():
            tensors = load_file(cache_path)
            if tensors["chosen"].numel() == len(pairs):
                return CachedLogps(tensors["chosen"], tensors["rejected"], cache_path, hit=True)
        chosen, rejected = [], []
        for start in range(0, len(pairs), batch_size):
            batch = collate(pairs[start:start + batch_size])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            sums = reference.sequence_logps(batch).cpu()
            half = sums.shape[0] // 2
            chosen.append(sums[:half])
            rejected.append(sums[half:])
        result = {"chosen": torch.cat(chosen).contiguous(), "rejected": torch.cat(rejected).contiguous()}
        if accelerator is None or accelerator.is_main_process:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            staging = cache_path.with_suffix(".partial")
            save_file(result, staging, metadata={"format": CACHE_FORMAT, "pairs": str(len(pairs))})
            staging.replace(cache_path)
    return CachedLogps(result["chosen"], result["rejected"], cache_path, hit=False)


def describe(cached: CachedLogps) -> dict:
    return {"path": str(cached.path), "reused": cached.hit, "pairs": int(cached.chosen.numel())}


def write_description(run_dir: Path, entries: dict) -> None:
    (run_dir / "reference_cache.json").write_text(json.dumps(entries, indent=2))
