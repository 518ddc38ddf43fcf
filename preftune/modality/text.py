"""A causal LM seen as a function from token ids to per-token log-probs of its completions.

The loop prepares (and, under data parallelism, wraps) this module rather than the bare language
model, so that the forward that computes chunked log-probs is the one the distributed wrapper sees.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.collate import collate_pairs, collate_pairs_packed
from ..data.packed import PackedLayout, is_packed
from ..logprobs import packed_sequence_logprobs, token_logprobs
from ..speed.attention import check_block_attention, supports_packing, supports_prefix_sharing

PACKED_KEYS = ("input_ids", "attention_mask", "position_ids", "prompt_lengths", "completion_lengths")


class PolicyLogprobs(nn.Module):
    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                completion_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                prompt_lengths: torch.Tensor | None = None,
                completion_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Padded rows: ``[B, L]`` per-token log-probs. A packed batch (``completion_lengths`` given): ``[S]``
        summed log-probs per sequence."""
        if completion_lengths is not None:
            batch = dict(zip(PACKED_KEYS, (input_ids, attention_mask, position_ids, prompt_lengths,
                                           completion_lengths)))
            return packed_sequence_logprobs(self.model, batch, self.chunk_size)
        return token_logprobs(self.model, input_ids, attention_mask, completion_mask, chunk_size=self.chunk_size)


def sequence_sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-probs, completion lengths)`` of every sequence of a padded or packed batch, through the
    :class:`PolicyLogprobs` ``model`` (called as a module, so a distributed wrapper sees the forward)."""
    if is_packed(batch):
        sums = model(**{key: batch[key] for key in PACKED_KEYS})
        return sums, PackedLayout.of(batch).lengths().to(sums.device)
    sums = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum(-1)
    return sums, batch["completion_mask"].sum(-1).float()


class PairCollator:
    """Pairs -> padded rows, or one packed row (prefix-shared blocks, or a block per sequence)."""

    def __init__(self, pad_token_id: int, packed: bool = False, share_prefix: bool = False):
        self.pad_token_id = pad_token_id
        self.packed = packed
        self.share_prefix = share_prefix and packed

    @classmethod
    def for_model(cls, cfg, pad_token_id: int, model: nn.Module | None) -> PairCollator:
        """The layout the config asks for, as far as ``model``'s attention allows (None: padded)."""
        if model is None:
            return cls(pad_token_id)
        share = getattr(cfg, "prefix_sharing", False) and supports_prefix_sharing(model)
        packed = (share or getattr(cfg, "padding_free", False)) and supports_packing(model)
        if packed and not check_block_attention(model):   # attention that ignores the layout: stay padded
            return cls(pad_token_id)
        return cls(pad_token_id, packed, share)

    def __call__(self, pairs) -> dict[str, torch.Tensor]:
        if self.packed:
            return collate_pairs_packed(pairs, self.share_prefix)
        return collate_pairs(pairs, self.pad_token_id)
